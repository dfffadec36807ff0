//! An independent reading of the text the host hands to `nft -f -` and
//! `iptables-restore --noflush`: written from the tools' grammars, not
//! from the host's writer or validator, so that it can disagree with them.

/// Every line of an nft script is one command (nft also ends a command
/// at `;` outside braces and strings, and a string or a brace left open
/// runs on into the next line) addressing kwp's own table.
pub fn nft_script(script: &str, table: &str) -> Result<(), String> {
    for (n, line) in script.lines().enumerate() {
        let n = n + 1;
        control_free(line).map_err(|e| format!("line {n}: {e}"))?;
        let (mut depth, mut quoted) = (0i64, false);
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                _ if quoted => {}
                '#' => break,
                '{' => depth += 1,
                '}' => depth -= 1,
                ';' if depth == 0 => {
                    return Err(format!("line {n}: a `;` starts a second command"));
                }
                _ => {}
            }
            if depth < 0 {
                return Err(format!("line {n}: closes a brace it did not open"));
            }
        }
        if quoted || depth != 0 {
            return Err(format!(
                "line {n}: leaves a string or brace open, so the next line joins this command"
            ));
        }
        let words: Vec<&str> = line.split_whitespace().take(4).collect();
        let [verb, kind, family, in_table] = words[..] else {
            return Err(format!("line {n}: not a whole command"));
        };
        let verbs = [
            "add", "create", "delete", "destroy", "flush", "insert", "replace",
        ];
        let kinds = ["table", "chain", "rule", "set", "map", "element"];
        if !verbs.contains(&verb) || !kinds.contains(&kind) {
            return Err(format!(
                "line {n}: `{verb} {kind}` is not a command the host writes"
            ));
        }
        if !["ip", "ip6"].contains(&family) || in_table != table {
            return Err(format!("line {n}: addresses table {family} {in_table}"));
        }
    }
    Ok(())
}

/// The built-in chains the host hooks its own chains into.
const BUILT_IN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// iptables-restore input: tables nat and filter, chain declarations and
/// deletions of kwp's chains only, rules in kwp's chains or jumps from a
/// built-in chain to one of them, and no option that is a command.
pub fn iptables_restore(text: &str, prefix: &str) -> Result<(), String> {
    let own = |chain: &str| chain.starts_with(prefix) && chain.len() > prefix.len();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        control_free(line).map_err(|e| format!("line {n}: {e}"))?;
        if line.contains(['"', '\'', '\\']) {
            return Err(format!(
                "line {n}: quoting changes how iptables-restore splits it"
            ));
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] | ["COMMIT"] => {}
            [w] if w.starts_with('#') => {}
            [table] if table.starts_with('*') => {
                if !["*nat", "*filter"].contains(table) {
                    return Err(format!("line {n}: table {table}"));
                }
            }
            [decl, ..] if decl.starts_with(':') => {
                if !own(&decl[1..]) {
                    return Err(format!("line {n}: declares {decl}"));
                }
            }
            ["-X" | "-F" | "-N", chain] => {
                if !own(chain) {
                    return Err(format!("line {n}: flushes or deletes chain {chain}"));
                }
            }
            ["-A" | "-I" | "-D", chain, rule @ ..] => {
                if let Some(word) = rule.iter().find(|w| is_command(w)) {
                    return Err(format!("line {n}: option {word} is a command"));
                }
                let targets = jump_targets(rule).map_err(|e| format!("line {n}: {e}"))?;
                let standard = [
                    "DNAT",
                    "SNAT",
                    "MASQUERADE",
                    "MARK",
                    "RETURN",
                    "ACCEPT",
                    "DROP",
                    "REJECT",
                ];
                if let Some(t) = targets.iter().find(|t| !own(t) && !standard.contains(t)) {
                    return Err(format!("line {n}: jumps to {t}"));
                }
                let hooked = BUILT_IN.contains(chain) && targets.iter().any(|t| own(t));
                if !own(chain) && !hooked {
                    return Err(format!("line {n}: a rule in {chain}"));
                }
            }
            _ => return Err(format!("line {n}: not a line the host writes")),
        }
    }
    Ok(())
}

/// iptables(8) options that are commands, as getopt reads them: exact
/// short options, long ones and their unambiguous abbreviations.
fn is_command(word: &str) -> bool {
    let short = [
        "-A", "-C", "-D", "-I", "-R", "-L", "-S", "-F", "-Z", "-N", "-X", "-P", "-E", "-t",
    ];
    let long = [
        "--append",
        "--check",
        "--delete",
        "--insert",
        "--replace",
        "--list",
        "--list-rules",
        "--flush",
        "--zero",
        "--new-chain",
        "--delete-chain",
        "--policy",
        "--rename-chain",
        "--table",
    ];
    let name = word.split('=').next().unwrap_or(word);
    short.contains(&word) || (name.len() > 2 && long.iter().any(|l| l.starts_with(name)))
}

/// Where a rule jumps, reading its words as getopt does: `-j T`, `-jT`,
/// `-vj T` (bundled short options), `--jump T`, `--ju T`, `--jump=T`, and
/// the same for goto.
fn jump_targets<'a>(rule: &[&'a str]) -> Result<Vec<&'a str>, String> {
    // Short options of iptables that take an argument: what follows them
    // in a bundle is that argument, not more options.
    const WITH_ARGUMENT: &str = "ACDIRLSFZNXPEtpsdiojgmwc";
    let mut targets = Vec::new();
    let mut words = rule.iter().copied();
    while let Some(w) = words.next() {
        let mut take_next = |targets: &mut Vec<&'a str>| match words.next() {
            Some(t) => {
                targets.push(t);
                Ok(())
            }
            None => Err(format!("{w} without a target")),
        };
        if let Some(long) = w.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            if !name.is_empty() && ("jump".starts_with(name) || "goto".starts_with(name)) {
                match value {
                    Some(v) => targets.push(v),
                    None => take_next(&mut targets)?,
                }
            }
        } else if let Some(bundle) = w.strip_prefix('-') {
            for (i, c) in bundle.char_indices() {
                if c == 'j' || c == 'g' {
                    match &bundle[i + 1..] {
                        "" => take_next(&mut targets)?,
                        attached => targets.push(attached),
                    }
                    break;
                }
                if WITH_ARGUMENT.contains(c) {
                    break;
                }
            }
        }
    }
    Ok(targets)
}

/// A NUL ends the text a C tool reads; other control characters have no
/// business in rules either.
fn control_free(line: &str) -> Result<(), String> {
    match line.chars().find(|c| c.is_control() && *c != '\t') {
        Some(c) => Err(format!("holds the control character {c:?}")),
        None => Ok(()),
    }
}
