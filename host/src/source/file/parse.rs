//! One file's text -> Services, EndpointSlices and Nodes.
//!
//! The text is first walked as a YAML event stream with hard limits on
//! nesting depth and node count, stopping at the first event past a limit;
//! only text within the limits is deserialised. libyaml's scanner costs
//! O(depth) per token, so a deeply nested document would otherwise take
//! minutes (quadratic) before serde_yaml_ng's own recursion limit applies.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

/// Deepest nesting of sequences and mappings accepted (Kubernetes objects
/// use about 10).
pub const MAX_DEPTH: usize = 64;
/// Most YAML nodes (scalars, sequences, mappings, aliases) in one file: an
/// 8 MiB file of real objects (about 20 bytes a node) stays well below it,
/// and it bounds the memory serde_yaml_ng needs for one file.
pub const MAX_NODES: usize = 1_000_000;

/// The objects found in one file.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

/// Parses one file's documents. Unknown kinds are ignored (a directory
/// may hold Deployments too); a known kind that does not parse is an error
/// naming the document and the object.
pub fn parse_objects(text: &str) -> Result<Objects> {
    check_limits(text)?;
    let mut out = Objects::default();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc)
            .with_context(|| format!("document {}", i + 1))?;
        if value.is_null() {
            continue;
        }
        add_object(value, &mut out).with_context(|| format!("document {}", i + 1))?;
    }
    Ok(out)
}

/// `kind namespace/name` of an object, for errors.
fn describe(kind: &str, value: &serde_yaml_ng::Value) -> String {
    let meta = value.get("metadata");
    let field = |f: &str| {
        meta.and_then(|m| m.get(f))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let (ns, name) = (field("namespace"), field("name"));
    match (ns.is_empty(), name.is_empty()) {
        (_, true) => format!("{kind} without a name"),
        (true, false) => format!("{kind} {name}"),
        (false, false) => format!("{kind} {ns}/{name}"),
    }
}

fn add_object(value: serde_yaml_ng::Value, out: &mut Objects) -> Result<()> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let what = describe(&kind, &value);
    let invalid = || format!("invalid {what}");
    match kind.as_str() {
        "Service" => out
            .services
            .push(serde_yaml_ng::from_value(value).with_context(invalid)?),
        "EndpointSlice" => out
            .slices
            .push(serde_yaml_ng::from_value(value).with_context(invalid)?),
        "Node" => out
            .nodes
            .push(serde_yaml_ng::from_value(value).with_context(invalid)?),
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
            let serde_yaml_ng::Value::Mapping(mut map) = value else {
                bail!("invalid {kind}")
            };
            let items = map.remove("items").unwrap_or_default();
            let serde_yaml_ng::Value::Sequence(items) = items else {
                bail!("{kind} without items")
            };
            for (i, mut item) in items.into_iter().enumerate() {
                // Typed lists may leave out each item's kind.
                if let (Some(kind), serde_yaml_ng::Value::Mapping(m)) = (
                    kind.strip_suffix("List").filter(|k| !k.is_empty()),
                    &mut item,
                ) {
                    m.entry("kind".into()).or_insert(kind.into());
                }
                add_object(item, out).with_context(|| format!("item {i}"))?;
            }
        }
        "" => bail!("object without kind"),
        _ => {}
    }
    Ok(())
}

/// Walks the YAML event stream; an error if nesting exceeds [`MAX_DEPTH`]
/// or the file holds more than [`MAX_NODES`] nodes. Stops at the first
/// event past a limit, so the cost is bounded by the limits, not the input.
pub fn check_limits(text: &str) -> Result<()> {
    use unsafe_libyaml::yaml_event_type_t as y;
    let mut events = Events::new(text);
    let (mut depth, mut nodes) = (0usize, 0usize);
    loop {
        let (kind, line) = events.next()?;
        match kind {
            y::YAML_STREAM_END_EVENT => return Ok(()),
            y::YAML_SEQUENCE_START_EVENT | y::YAML_MAPPING_START_EVENT => {
                depth += 1;
                nodes += 1;
                if depth > MAX_DEPTH {
                    bail!("nested deeper than {MAX_DEPTH} levels (line {line})");
                }
            }
            y::YAML_SEQUENCE_END_EVENT | y::YAML_MAPPING_END_EVENT => {
                depth = depth.saturating_sub(1)
            }
            y::YAML_SCALAR_EVENT | y::YAML_ALIAS_EVENT => nodes += 1,
            _ => {}
        }
        if nodes > MAX_NODES {
            bail!("more than {MAX_NODES} YAML nodes (line {line})");
        }
    }
}

/// libyaml's parser over a borrowed string, one event at a time.
struct Events<'a> {
    parser: Box<std::mem::MaybeUninit<unsafe_libyaml::yaml_parser_t>>,
    _text: &'a str,
}

impl<'a> Events<'a> {
    fn new(text: &'a str) -> Self {
        let mut parser = Box::new(std::mem::MaybeUninit::<unsafe_libyaml::yaml_parser_t>::uninit());
        // SAFETY: initialize writes the whole struct (it cannot fail but for
        // allocation, which aborts); the input outlives the parser ('a).
        unsafe {
            let p = parser.as_mut_ptr();
            let _ = unsafe_libyaml::yaml_parser_initialize(p);
            unsafe_libyaml::yaml_parser_set_input_string(p, text.as_ptr(), text.len() as u64);
        }
        Self {
            parser,
            _text: text,
        }
    }

    /// The next event's type and (1-based) line.
    fn next(&mut self) -> Result<(unsafe_libyaml::yaml_event_type_t, u64)> {
        let mut event = std::mem::MaybeUninit::<unsafe_libyaml::yaml_event_t>::uninit();
        // SAFETY: the parser was initialised in new; a successful parse
        // fills the event, which is read and then deleted exactly once.
        unsafe {
            let p = self.parser.as_mut_ptr();
            if unsafe_libyaml::yaml_parser_parse(p, event.as_mut_ptr()).fail {
                // The parser's public error view (valid: initialised).
                let view = &*p;
                let (problem, mark) = (view.problem, view.problem_mark);
                let reason = if problem.is_null() {
                    "invalid YAML".to_string()
                } else {
                    std::ffi::CStr::from_ptr(problem.cast())
                        .to_string_lossy()
                        .into_owned()
                };
                bail!("{reason} at line {}", mark.line + 1);
            }
            let event = event.assume_init_mut();
            let kind = event.type_;
            let line = event.start_mark.line + 1;
            unsafe_libyaml::yaml_event_delete(event);
            Ok((kind, line))
        }
    }
}

impl Drop for Events<'_> {
    fn drop(&mut self) {
        // SAFETY: initialised in new, deleted once here.
        unsafe { unsafe_libyaml::yaml_parser_delete(self.parser.as_mut_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_multi_documents_and_ignores_other_kinds() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n\
                    ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: []\n";
        let o = parse_objects(text).unwrap();
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.slices.len(), 1);
    }

    #[test]
    fn deep_nesting_is_refused_quickly_at_any_size() {
        for text in [
            "[".repeat(8 << 20),
            "{a: ".repeat(1 << 20),
            "- ".repeat(100_000) + "x",
        ] {
            let started = std::time::Instant::now();
            let e = parse_objects(&text).unwrap_err();
            assert!(format!("{e:#}").contains("nested deeper than 64"), "{e:#}");
            assert!(
                started.elapsed() < std::time::Duration::from_millis(500),
                "took {:?}",
                started.elapsed()
            );
        }
        // Just within the limit is fine.
        let ok = format!("x: {}1{}", "[".repeat(63), "]".repeat(63));
        check_limits(&ok).unwrap();
        let too_deep = format!("x: {}1{}", "[".repeat(64), "]".repeat(64));
        assert!(check_limits(&too_deep).is_err());
    }

    #[test]
    fn too_many_nodes_are_refused() {
        let text = "[".to_string() + &"1,".repeat(MAX_NODES) + "1]";
        let e = check_limits(&text).unwrap_err();
        assert!(format!("{e:#}").contains("YAML nodes"), "{e:#}");
        let fine = "[".to_string() + &"1,".repeat(1000) + "1]";
        check_limits(&fine).unwrap();
    }

    #[test]
    fn errors_name_the_document_and_the_object() {
        let text = "kind: Service\nmetadata: {name: a, namespace: t}\nspec: {clusterIP: 10.0.0.1}\n---\nkind: Service\nmetadata: {name: b, namespace: t}\nspec: {ports: notalist}\n";
        let e = format!("{:#}", parse_objects(text).unwrap_err());
        assert!(e.contains("document 2: invalid Service t/b"), "{e}");
        let e = format!("{:#}", parse_objects("a: [1, 2\n").unwrap_err());
        assert!(e.contains("line"), "{e}");
    }
}
