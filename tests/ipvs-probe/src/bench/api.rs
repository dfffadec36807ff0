//! The benchmark through a real API server (KWP_IPVS_VM_NET=1): the three
//! proxies (kwp nftables, kwp IPVS, upstream kube-proxy `--proxy-mode ipvs`)
//! watch one kube-apiserver on the host, reached as 10.0.2.2 through QEMU's
//! user networking. The host's control server (scripts/ipvs-vm-bench-api.py)
//! creates the Services and makes each change, so the guest times a change
//! from the moment it asks for the write (one clock, the guest's).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

/// Where the API-server setup lives, from the `api=` option
/// (`KUBECONFIG,CONTROL_ADDR,KUBE_PROXY`).
#[derive(Clone, Debug)]
pub struct Api {
    pub kubeconfig: String,
    pub control: SocketAddr,
    /// The upstream kube-proxy binary (placed in the guest by the script).
    pub kube_proxy: String,
}

/// The API server gives 10.96.0.1 to `default/kubernetes` and 10.96.0.0 is
/// its range's network address, so Service s gets cluster_ip(s + 256)
/// (the same offset as scripts/ipvs-vm-bench-api.py).
pub const IP_OFFSET: usize = 256;

impl Api {
    pub fn parse(spec: &str) -> Result<Self> {
        let [kubeconfig, control, kube_proxy] = spec.split(',').collect::<Vec<_>>()[..] else {
            bail!("api= wants KUBECONFIG,CONTROL_ADDR,KUBE_PROXY, got {spec:?}");
        };
        Ok(Self {
            kubeconfig: kubeconfig.into(),
            control: control
                .parse()
                .with_context(|| format!("control address {control:?}"))?,
            kube_proxy: kube_proxy.into(),
        })
    }

    pub fn spec(&self) -> String {
        format!("{},{},{}", self.kubeconfig, self.control, self.kube_proxy)
    }

    /// One POST to the control server; its answer's body.
    fn post(&self, path: &str, timeout: Duration) -> Result<String> {
        let mut conn = TcpStream::connect_timeout(&self.control, Duration::from_secs(10))
            .with_context(|| format!("connecting to the control server {}", self.control))?;
        conn.set_read_timeout(Some(timeout))?;
        // HTTP/1.0: the server closes after its answer, so the answer is
        // everything up to EOF.
        write!(
            conn,
            "POST {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            self.control
        )?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)
            .with_context(|| format!("reading the answer to {path}"))?;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        ensure!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{path}: {head} {body}"
        );
        Ok(body.to_string())
    }

    /// Makes the API server hold Services 0..n (minutes at 10k).
    pub fn grow(&self, n: usize) -> Result<String> {
        self.post(&format!("/grow?n={n}"), Duration::from_secs(3600))
    }

    /// Points Service s's first endpoint at `ip`; returns when the API
    /// server took the write.
    pub fn shift(&self, s: usize, ip: std::net::Ipv4Addr) -> Result<()> {
        self.post(&format!("/shift?s={s}&ip={ip}"), Duration::from_secs(60))
            .map(drop)
    }
}
