//! Set-element deltas straight to nf_tables over netlink: one batch
//! (`NFNL_MSG_BATCH_BEGIN`, a `NEWSETELEM`/`DELSETELEM` per set, `BATCH_END`),
//! committed or refused as a whole like an `nft -f` transaction.
//!
//! Why: most changes of a plain Service are element changes of maps and
//! sets that already exist, and spawning `nft` (which loads its cache of
//! the table first) costs ~11 ms of the ~18 ms such a change took at 10k
//! Services. Chains, set creation and the full reconcile stay in nft text.
//!
//! Why a codec of our own and not `nftnl`/`netlink-packet-netfilter`/`neli`:
//! `nftnl` binds the C libnftnl (a build dependency on every machine), and
//! the pure-Rust crates do not model set elements with concatenated keys
//! and verdict data; what we need is ~200 lines over the attribute builder
//! the IPVS codec already has, with no new dependency.
//!
//! The encoder knows the key and data types the nftables plugin declares
//! (`type`/`typeof` of addresses, protocols, ports and `numgen`); anything
//! else returns `None` and the whole delta goes through nft text instead,
//! never dropped.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::abi::{
    NFPROTO_IPV4, NFPROTO_IPV6, NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM, NFTA_DATA_VALUE,
    NFTA_LIST_ELEM, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE,
};
use super::script::{Counts, Obj, Objects, Qualified};
use crate::dataplane::ipvs::netlink::Attrs;
use crate::plan::NftFamily;

const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_CONTINUE: i32 = -1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

/// One field of a key or value, as the kernel stores it in a register:
/// each field of a concatenation takes a multiple of 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `ipv4_addr`, `ip daddr`: 4 bytes, network order.
    Ipv4,
    /// `ipv6_addr`, `ip6 daddr`: 16 bytes, network order.
    Ipv6,
    /// `inet_proto`, `meta l4proto`: 1 byte, padded to 4.
    Proto,
    /// `inet_service`, `th dport`: 2 bytes, network order, padded to 4.
    Service,
    /// `numgen ... mod N`: a 32-bit integer in host order (numgen writes
    /// the register natively, and nft declares it host-endian).
    HostU32,
}

impl Field {
    /// The field's size outside a concatenation.
    fn natural_len(self) -> usize {
        match self {
            Field::Ipv4 | Field::HostU32 => 4,
            Field::Ipv6 => 16,
            Field::Proto => 1,
            Field::Service => 2,
        }
    }
}

/// What a set's elements carry besides their key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    None,
    Verdict,
    Value(Vec<Field>),
}

/// The byte layout of a set's elements, from its declaration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub key: Vec<Field>,
    pub data: Data,
}

impl Layout {
    /// The layout of `declaration` (`type A . B : C` or `typeof EXPR . EXPR : ...`),
    /// or `None` for anything else (flags, timeouts, other types): such a
    /// set's elements go through nft.
    pub fn of(declaration: &str) -> Option<Layout> {
        let decl = declaration.trim().trim_end_matches(';').trim();
        if decl.contains(';') {
            return None;
        }
        let (typed, rest) = if let Some(rest) = decl.strip_prefix("typeof ") {
            (false, rest)
        } else {
            (true, decl.strip_prefix("type ")?)
        };
        let fields = |s: &str| -> Option<Vec<Field>> {
            let parse = if typed { type_field } else { typeof_field };
            s.split(" . ").map(|f| parse(f.trim())).collect()
        };
        let mut parts = rest.split(" : ");
        let key = fields(parts.next()?)?;
        let data = match parts.next().map(str::trim) {
            None => Data::None,
            Some("verdict") => Data::Verdict,
            Some(value) => Data::Value(fields(value)?),
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Layout { key, data })
    }
}

fn type_field(name: &str) -> Option<Field> {
    Some(match name {
        "ipv4_addr" => Field::Ipv4,
        "ipv6_addr" => Field::Ipv6,
        "inet_proto" => Field::Proto,
        "inet_service" => Field::Service,
        _ => return None,
    })
}

fn typeof_field(expr: &str) -> Option<Field> {
    let words: Vec<&str> = expr.split_whitespace().collect();
    Some(match words.as_slice() {
        ["ip", "saddr" | "daddr"] => Field::Ipv4,
        ["ip6", "saddr" | "daddr"] => Field::Ipv6,
        ["meta", "l4proto"] => Field::Proto,
        ["th" | "tcp" | "udp" | "sctp", "sport" | "dport"] => Field::Service,
        ["numgen", "random" | "inc", "mod", n] if n.parse::<u32>().is_ok() => Field::HostU32,
        _ => return None,
    })
}

/// An element's encoded key and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub key: Vec<u8>,
    pub data: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Bytes(Vec<u8>),
    Verdict { code: i32, chain: Option<String> },
}

/// `element` (nft's text form, `k1 . k2 [: v1 . v2]`) in `layout`, or
/// `None` if any part is not understood. `key_only` encodes the key of a
/// map element alone (deletion is by key).
pub fn encode(layout: &Layout, element: &str, key_only: bool) -> Option<Encoded> {
    let mut parts = element.split(" : ");
    let key = concat(&layout.key, parts.next()?)?;
    let value = parts.next();
    if parts.next().is_some() {
        return None;
    }
    let data = match (&layout.data, value) {
        (_, _) if key_only => None,
        (Data::None, None) => None,
        (Data::Verdict, Some(v)) => Some(verdict(v.trim())?),
        (Data::Value(fields), Some(v)) => Some(Value::Bytes(concat(fields, v)?)),
        _ => return None,
    };
    Some(Encoded { key, data })
}

fn concat(fields: &[Field], text: &str) -> Option<Vec<u8>> {
    let values: Vec<&str> = text.split(" . ").map(str::trim).collect();
    if values.len() != fields.len() {
        return None;
    }
    let mut out = Vec::new();
    for (field, value) in fields.iter().zip(values) {
        match field {
            Field::Ipv4 => out.extend(value.parse::<Ipv4Addr>().ok()?.octets()),
            Field::Ipv6 => out.extend(value.parse::<Ipv6Addr>().ok()?.octets()),
            Field::Proto => {
                let number = match value {
                    "tcp" => 6,
                    "udp" => 17,
                    "sctp" => 132,
                    n => n.parse::<u8>().ok()?,
                };
                out.extend([number, 0, 0, 0]);
            }
            Field::Service => {
                let [hi, lo] = value.parse::<u16>().ok()?.to_be_bytes();
                out.extend([hi, lo, 0, 0]);
            }
            Field::HostU32 => out.extend(value.parse::<u32>().ok()?.to_ne_bytes()),
        }
    }
    // Only concatenations pad each field to 4 bytes; a key of one field is
    // its natural length (a lone `inet_service` is 2 bytes, as nft sends it;
    // padded, the kernel refuses the element with EINVAL).
    if let [field] = fields {
        out.truncate(field.natural_len());
    }
    Some(out)
}

fn verdict(text: &str) -> Option<Value> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let chain = |code: i32, name: &str| {
        let plain = !name.is_empty() && !name.contains(['"', '\\', '$', '@']);
        plain.then(|| Value::Verdict {
            code,
            chain: Some(name.to_string()),
        })
    };
    let bare = |code: i32| Some(Value::Verdict { code, chain: None });
    match words.as_slice() {
        ["drop"] => bare(NF_DROP),
        ["accept"] => bare(NF_ACCEPT),
        ["continue"] => bare(NFT_CONTINUE),
        ["return"] => bare(NFT_RETURN),
        ["goto", name] => chain(NFT_GOTO, name),
        ["jump", name] => chain(NFT_JUMP, name),
        _ => None,
    }
}

/// One message of a batch: elements added to or deleted from one set.
#[derive(Debug)]
pub struct Message {
    pub add: bool,
    pub family: NftFamily,
    pub set: String,
    /// The elements' text, for error messages.
    pub elements: Vec<String>,
    /// nf_tables message type and payload (nfgenmsg onwards is built by
    /// the sender; this is the attribute part).
    pub kind: u16,
    pub attrs: Vec<u8>,
}

impl Message {
    /// `adding 2 elements to ip kwp service-ips (a, b)`, for errors.
    pub fn describe(&self, table: &str) -> String {
        let verb = if self.add { "adding" } else { "deleting" };
        let prep = if self.add { "to" } else { "from" };
        let shown: Vec<&str> = self.elements.iter().take(3).map(String::as_str).collect();
        let more = if self.elements.len() > 3 { ", ..." } else { "" };
        format!(
            "{verb} {} element(s) {prep} {} {table} {} ({}{more})",
            self.elements.len(),
            self.family,
            self.set,
            shown.join(", ")
        )
    }

    pub fn nfproto(&self) -> u8 {
        match self.family {
            NftFamily::Ip6 => NFPROTO_IPV6,
            _ => NFPROTO_IPV4,
        }
    }
}

/// The element changes of one delta, encoded: what the netlink path sends.
#[derive(Debug, Default)]
pub struct ElementBatch {
    pub table: String,
    pub messages: Vec<Message>,
}

impl ElementBatch {
    /// The messages deleting `deleted` then adding `added` (the order of
    /// the nft script), or `None` if any element's set has no layout the
    /// encoder knows. `layout_of` says how a set is declared.
    pub fn encode(
        table: &str,
        deleted: &[Element],
        added: &[Element],
        layout_of: impl Fn(&Qualified) -> Option<Layout>,
    ) -> Option<ElementBatch> {
        let mut batch = ElementBatch {
            table: table.to_string(),
            messages: Vec::new(),
        };
        for (add, elements) in [(false, deleted), (true, added)] {
            let mut by_set: std::collections::BTreeMap<Qualified, Vec<&str>> = Default::default();
            for (f, set, e) in elements {
                by_set.entry((*f, set.clone())).or_default().push(e);
            }
            for ((family, set), elements) in by_set {
                let layout = layout_of(&(family, set.clone()))?;
                let mut list = Attrs::default();
                for element in &elements {
                    let encoded = encode(&layout, element, !add)?;
                    list.nested(NFTA_LIST_ELEM, element_attrs(&encoded));
                }
                let mut attrs = Attrs::default();
                attrs
                    .str(NFTA_SET_ELEM_LIST_TABLE, table)
                    .str(NFTA_SET_ELEM_LIST_SET, &set)
                    .nested(NFTA_SET_ELEM_LIST_ELEMENTS, list);
                batch.messages.push(Message {
                    add,
                    family,
                    set,
                    elements: elements.iter().map(|e| e.to_string()).collect(),
                    kind: if add {
                        NFT_MSG_NEWSETELEM
                    } else {
                        NFT_MSG_DELSETELEM
                    },
                    attrs: attrs.0,
                });
            }
        }
        Some(batch)
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Bytes of the attributes, to keep a batch within one socket buffer.
    pub fn size(&self) -> usize {
        self.messages.iter().map(|m| m.attrs.len() + 20).sum()
    }
}

/// `NFTA_LIST_ELEM`'s contents: the key, and the data of a map element.
fn element_attrs(encoded: &Encoded) -> Attrs {
    let mut key = Attrs::default();
    key.put(NFTA_DATA_VALUE, &encoded.key);
    let mut elem = Attrs::default();
    elem.nested(NFTA_SET_ELEM_KEY, key);
    match &encoded.data {
        None => {}
        Some(Value::Bytes(bytes)) => {
            let mut data = Attrs::default();
            data.put(NFTA_DATA_VALUE, bytes);
            elem.nested(NFTA_SET_ELEM_DATA, data);
        }
        Some(Value::Verdict { code, chain }) => {
            let mut verdict = Attrs::default();
            verdict.put(NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(chain) = chain {
                verdict.str(NFTA_VERDICT_CHAIN, chain);
            }
            let mut data = Attrs::default();
            data.nested(NFTA_DATA_VERDICT, verdict);
            elem.nested(NFTA_SET_ELEM_DATA, data);
        }
    }
    elem
}

/// An element's `(family, set, text)`.
pub type Element = (NftFamily, String, String);

/// The element changes of a delta, if it changes nothing but elements of
/// sets that stay (no set or chain created, deleted or changed): the
/// elements deleted and added, as `Script::delta` writes them.
pub fn element_only_delta(
    old: &Objects,
    new: &Objects,
    counts: &Counts<'_>,
) -> Option<(Vec<Element>, Vec<Element>)> {
    let structural =
        (old.tables().chain(new.tables())).any(|o| counts.added(&o) || counts.removed(&o));
    let chains_changed =
        (new.chains.iter()).any(|(q, c)| old.chains.get(q).is_some_and(|o| o != c));
    let sets_changed = (new.sets.iter()).any(|(q, d)| old.sets.get(q).is_some_and(|o| o != d));
    if structural || chains_changed || sets_changed {
        return None;
    }
    let object = |(f, s, e): &Element| Obj::Element(*f, s.clone(), e.clone());
    let deleted = (old.elements.iter())
        .filter(|e| counts.removed(&object(e)))
        .cloned()
        .collect();
    let added = (new.elements.iter())
        .filter(|e| counts.added(&object(e)))
        .cloned()
        .collect();
    Some((deleted, added))
}
