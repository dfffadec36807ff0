//! The bundled plugins, embedded in the binary so that it works with no
//! plugin directory. A plugin file of the same name in the plugin directory
//! takes precedence.

/// `(plugin name, component bytes)`. Names drop the `kwp_plugin_` prefix and
/// use dashes: `round-robin`, `random`, `userspace`.
pub fn bundled() -> impl Iterator<Item = (String, &'static [u8])> {
    const TABLE: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/bundle.rs"));
    TABLE
        .iter()
        .map(|(artifact, bytes)| (plugin_name(artifact), *bytes))
}

/// `kwp_plugin_round_robin` -> `round-robin`.
pub fn plugin_name(artifact: &str) -> String {
    artifact.trim_start_matches("kwp_plugin_").replace('_', "-")
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_bundled_plugin_is_a_component() {
        let names: Vec<_> = super::bundled().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "round-robin",
                "random",
                "userspace",
                "nftables",
                "ipvs",
                "iptables",
                "maglev",
                "weighted",
                "least-connections"
            ]
        );
        for (name, bytes) in super::bundled() {
            // Component binaries start with the wasm magic and layer 1.
            assert_eq!(&bytes[..4], b"\0asm", "{name}");
            assert_eq!(
                bytes[6..8],
                [1, 0],
                "{name} is a core module, not a component"
            );
        }
    }
}
