//! Typed configuration values. Each parser takes the name the user wrote
//! (`--cluster-cidr`, `iptables.syncPeriod`) so that an error names it, and
//! returns a value that is safe to place into kernel rule text: nothing
//! from configuration reaches nft, iptables or IPVS as raw text.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};

use crate::model::Cidr;

/// The longest accepted syncPeriod: a full resync less than once a day
/// would leave a drifted kernel unrepaired for too long.
pub const MAX_SYNC_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// Go's `time.Duration` limit (int64 nanoseconds, about 292 years).
const MAX_DURATION_NANOS: u128 = i64::MAX as u128;

/// Go-style durations as kube-proxy takes them: `1s`, `500ms`, `1m30s`,
/// `1.5h`, `0`. Values Go could not hold are an error, never a panic.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty duration".into());
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or(format!("{s:?}: missing unit (e.g. 30s, 500ms, 1m)"))?;
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"
                ));
            }
        };
        let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
        if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(format!("{s:?}: bad number {num:?}"));
        }
        let too_long = || format!("{s:?}: too long (at most about 292 years)");
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_long())?
        };
        // Fractions beyond nanoseconds are dropped, as Go does.
        let mut part = whole.checked_mul(scale).ok_or_else(too_long)?;
        let mut place = scale;
        for digit in frac.bytes().take(30) {
            place /= 10;
            part += u128::from(digit - b'0') * place;
        }
        nanos = nanos.checked_add(part).ok_or_else(too_long)?;
        if nanos > MAX_DURATION_NANOS {
            return Err(too_long());
        }
        rest = tail;
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// A duration as Go prints it (`30s`, `1m0s`, `1h30m0s`, `500ms`, `0s`):
/// the form upstream's KubeProxyConfiguration JSON uses.
pub fn go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let nanos = d.as_nanos();
    if nanos < 1_000_000_000 {
        let (unit, div) = match nanos {
            n if n < 1_000 => ("ns", 1),
            n if n < 1_000_000 => ("µs", 1_000),
            _ => ("ms", 1_000_000),
        };
        return format!("{}{unit}", trim_fraction(nanos, div));
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let seconds = trim_fraction(nanos % 60_000_000_000, 1_000_000_000);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

/// `value / div` with its fraction, trailing zeros dropped.
fn trim_fraction(value: u128, div: u128) -> String {
    let whole = value / div;
    let frac = value % div;
    if frac == 0 {
        return whole.to_string();
    }
    let width = div.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// A named duration: the value and what the user called it.
#[derive(Clone, Copy, Debug)]
pub struct Named<T> {
    pub value: T,
    pub name: &'static str,
}

/// syncPeriod in (0, 24h] and minSyncPeriod no longer than syncPeriod.
pub fn check_sync_periods(sync: Named<Duration>, min: Named<Duration>) -> Result<()> {
    if sync.value.is_zero() {
        bail!(
            "{}: must be greater than 0 (a zero period would resync without pause)",
            sync.name
        );
    }
    if sync.value > MAX_SYNC_PERIOD {
        bail!(
            "{} {}: must be at most {}",
            sync.name,
            go_duration(sync.value),
            go_duration(MAX_SYNC_PERIOD)
        );
    }
    if min.value > sync.value {
        bail!(
            "{} ({}) is longer than {} ({}): minSyncPeriod must not be longer than syncPeriod",
            min.name,
            go_duration(min.value),
            sync.name,
            go_duration(sync.value)
        );
    }
    Ok(())
}

/// A comma-separated list of CIDRs (`10.244.0.0/16,fd00::/64`).
pub fn cidr_list(text: &str, name: &str) -> Result<Vec<Cidr>> {
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| cidr(c, name))
        .collect()
}

/// One CIDR: an IP address, `/`, a prefix length of at most 32 or 128.
pub fn cidr(text: &str, name: &str) -> Result<Cidr> {
    // Cidr's parser trims and accepts `+8`; a config value must be exact.
    let exact = text
        .split_once('/')
        .is_some_and(|(_, len)| !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()));
    if !exact || text.trim() != text {
        bail!("{name}: {text:?} is not a CIDR (expected e.g. 10.244.0.0/16 or fd00::/64)");
    }
    text.parse()
        .map_err(|e: String| anyhow!("{name}: {e} (expected e.g. 10.244.0.0/16 or fd00::/64)"))
}

/// Linux's IFNAMSIZ: 16 bytes with the terminating NUL.
const IFNAMSIZ: usize = 16;

/// A network interface name as the kernel accepts it (dev_valid_name:
/// 1..=15 bytes, not `.` or `..`, no `/`, `:` or whitespace), further
/// limited to printable ASCII without quotes or backslashes, so that it
/// can always be written as a quoted string in nft and iptables rules.
pub fn interface_name(text: &str, name: &str) -> Result<String> {
    check_interface_chars(text, name, IFNAMSIZ - 1)?;
    if text == "." || text == ".." {
        bail!("{name}: {text:?} is not a valid interface name");
    }
    Ok(text.to_string())
}

/// An interface name prefix: like a name, and short enough that at least
/// one more character fits (rules match it as `prefix*`).
pub fn interface_prefix(text: &str, name: &str) -> Result<String> {
    check_interface_chars(text, name, IFNAMSIZ - 2)?;
    Ok(text.to_string())
}

fn check_interface_chars(text: &str, name: &str, max: usize) -> Result<()> {
    if text.is_empty() {
        bail!("{name}: an interface name cannot be empty");
    }
    if text.len() > max {
        bail!(
            "{name}: {text:?} is {} bytes long; Linux interface names have at most {max}",
            text.len()
        );
    }
    if let Some(bad) = text
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '/' | ':' | '"' | '\'' | '\\' | '*'))
    {
        bail!("{name}: {text:?} is not a valid interface name (character {bad:?})");
    }
    Ok(())
}

/// A DNS-1123 subdomain (what a Node name must be): lowercase letters,
/// digits, `-` and `.`, at most 253 characters, each dot-separated label
/// starting and ending with a letter or digit.
pub fn dns1123_subdomain(text: &str) -> Result<(), String> {
    if text.is_empty() || text.len() > 253 {
        return Err(format!(
            "{text:?} must be 1 to 253 characters long (a DNS-1123 subdomain)"
        ));
    }
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    };
    if !text.split('.').all(label_ok) {
        return Err(format!(
            "{text:?} is not a valid DNS-1123 subdomain (lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// `0.0.0.0:10256`, `:10256` (all IPv4 addresses) or "" (disabled); the
/// port must be 1..=65535, as upstream requires.
pub fn bind_address(text: &str, name: &str) -> Result<Option<SocketAddr>> {
    if text.is_empty() {
        return Ok(None);
    }
    let full = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else {
        text.to_string()
    };
    let addr: SocketAddr = full
        .parse()
        .map_err(|_| anyhow!("{name}: {text:?} is not IP:port (e.g. 0.0.0.0:10256)"))?;
    if addr.port() == 0 {
        bail!("{name}: {text:?}: the port must be 1 to 65535");
    }
    Ok(Some(addr))
}

/// The IPVS schedulers of the Linux kernel (net/netfilter/ipvs); empty
/// means upstream's default, round robin.
pub const IPVS_SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];

pub fn ipvs_scheduler(text: &str, name: &str) -> Result<String> {
    match text {
        "" => Ok("rr".into()),
        s if IPVS_SCHEDULERS.contains(&s) => Ok(s.into()),
        s => bail!(
            "{name}: unknown IPVS scheduler {s:?} (one of {})",
            IPVS_SCHEDULERS.join(", ")
        ),
    }
}

/// `FIRST-LAST` (or one port), as kube-apiserver's `--service-node-port-range`.
pub fn port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{text:?}: {p:?} is not a port 1-65535"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("{text:?}: the range is empty"));
    }
    Ok(first..=last)
}
