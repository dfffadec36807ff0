//! What iptables mode reads over nf_tables netlink (iptables-nft keeps
//! its rules there): the ruleset generation, and each chain's rules
//! summarised as nftables mode's drift check summarises its own.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use super::super::abi::{NFPROTO_IPV4, NFPROTO_IPV6};
use super::super::kernel::Summary;
use super::{
    Fnv, NFT_MSG_GETRULE, NLM_F_ACK, RULE_CHAIN, RULE_EXPRESSIONS, RULE_USERDATA, Socket, TABLE,
    attr, attrs, chain_names_tries, cstr, expressions_digest, text,
};

/// The nf_tables ruleset generation: every committed transaction, in any
/// table and family, moves it; unchanged means nothing was written.
pub fn generation() -> Result<u32> {
    const NFT_MSG_GETGEN: u16 = 16;
    const GEN_ID: u16 = 1;
    let socket = Socket::open()?;
    let mut id = None;
    socket.dump_once(NFT_MSG_GETGEN, NLM_F_ACK, 0, &[], &mut |msg| {
        let attrs = attrs(msg);
        if let Some(b) = attrs.get(&GEN_ID).and_then(|b| b.get(..4)) {
            id = Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        }
    })?;
    id.context("nf_tables answered no generation")
}

/// Every chain of `table` in the `ip` (or `ip6`) family, summarised as
/// `inventory` summarises nftables mode's chains (empty ones included):
/// iptables mode's periodic compare: a chain dump, then a rule dump per
/// chain, folded as it arrives. With `only`, just those chains (named,
/// even when absent or empty): what iptables mode learns after a delta
/// wrote them.
pub fn chain_summaries(
    table: &str,
    ipv6: bool,
    only: Option<&[&str]>,
) -> Result<BTreeMap<String, Summary>> {
    let socket = Socket::open()?;
    let proto = if ipv6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
    let filter = attr(TABLE, &cstr(table));
    let mut out: BTreeMap<String, Summary> = BTreeMap::new();
    let fold = |out: &mut BTreeMap<String, Summary>, msg: &[u8]| {
        let attrs = attrs(msg);
        if text(&attrs, TABLE) != Some(table) {
            return;
        }
        if let Some(chain) = text(&attrs, RULE_CHAIN) {
            let mut digest = attrs
                .get(&RULE_EXPRESSIONS)
                .map_or(0, |e| expressions_digest(e));
            // iptables-nft keeps `-m comment` there.
            if let Some(comment) = attrs.get(&RULE_USERDATA) {
                let mut h = Fnv::default();
                h.write(comment);
                digest ^= h.0.rotate_left(1);
            }
            let summary = out.entry(chain.to_string()).or_default();
            summary.count += 1;
            summary.digest = summary.digest.wrapping_mul(0x100_0000_01b3) ^ digest;
        }
    };
    // A whole-table rule dump costs the kernel a walk from the table's
    // first rule for every batch it sends (quadratic: ~15 CPU s for
    // iptables-nft's nat at 10k Services); one dump per chain does not.
    let (listed, named): (Vec<String>, Vec<&str>);
    let only = match only {
        Some(only) => only,
        None => {
            // Long (60k chains at 10k Services): deltas committing beside
            // it interrupted five tries in a row (measured).
            listed = chain_names_tries(table, ipv6, 50)?;
            named = listed.iter().map(String::as_str).collect();
            &named
        }
    };
    for chain in only {
        let mut request = filter.clone();
        request.extend(attr(RULE_CHAIN, &cstr(chain)));
        let out = std::cell::RefCell::new(&mut out);
        // 60k dumps beside deltas committing (the compare's reads run
        // while changes are applied) met five interruptions in a row at
        // 10k Services (measured): each is tried more.
        socket.dump_each_tries(
            20,
            NFT_MSG_GETRULE,
            proto,
            &request,
            || {
                out.borrow_mut()
                    .insert(chain.to_string(), Summary::default());
            },
            |msg| fold(&mut out.borrow_mut(), msg),
        )?;
    }
    Ok(out)
}
