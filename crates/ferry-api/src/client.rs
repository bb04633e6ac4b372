//! [`Client`]: the [`Api`] over HTTP, talking to a running `ferry serve` (`--server URL`,
//! `--token T`). Every error comes back as the server's [`ApiError`]; a server that cannot be
//! reached is an [`ErrorKind::Unreachable`] error naming the URL.
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::*;

/// Largest answer the client reads (agent tasks carry block maps: 64 bytes of JSON a block).
pub const RESPONSE_LIMIT: u64 = 256 << 20;

/// Receives job snapshots while a request that runs a job is in flight.
pub type Progress = Arc<dyn Fn(&Job) + Send + Sync>;

/// An HTTP client of `ferry serve`.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    progress: Option<Progress>,
}

/// Percent-encodes one path segment (names are validated by the server; this keeps any
/// input, `../` included, inside its segment).
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// A client of the server at `url` (`http://127.0.0.1:7450`), authenticating with `token`.
    pub fn new(url: &str, token: Option<String>) -> ApiResult<Self> {
        Self::with_ca(url, token, None)
    }

    /// Like [`Client::new`]; an `https://` server's certificate may also be signed by the CA
    /// (or be the self-signed certificate) in the PEM file `ca`.
    pub fn with_ca(
        url: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> ApiResult<Self> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ApiError::bad_request(format!(
                "--server {url}: expected a URL such as http://127.0.0.1:7450 (the line `ferry serve` prints)"
            )));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .tls_config(tls_config(ca)?)
            .build();
        Ok(Client {
            base,
            token: token.filter(|t| !t.is_empty()),
            agent,
            progress: None,
        })
    }

    /// Shows job progress while requests that run a job are in flight.
    pub fn set_progress(&mut self, p: Progress) {
        self.progress = Some(p);
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn answer<T: DeserializeOwned>(
        &self,
        r: std::result::Result<ureq::Response, ureq::Error>,
    ) -> ApiResult<T> {
        match r {
            Ok(resp) => {
                // Read whole, then parse: parsing from a reader goes byte by byte, and agent
                // tasks carry megabytes of block maps.
                let mut body = Vec::new();
                use std::io::Read;
                let read = resp
                    .into_reader()
                    .take(RESPONSE_LIMIT)
                    .read_to_end(&mut body)
                    .map_err(|e| e.to_string());
                read.and_then(|_| serde_json::from_slice::<T>(&body).map_err(|e| e.to_string()))
                    .map_err(|e| {
                        ApiError::new(
                            ErrorKind::Internal,
                            format!("the server at {} sent an answer this ferry cannot read ({e}); are client and server the same version?", self.base),
                        )
                    })
            }
            Err(ureq::Error::Status(code, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                Err(serde_json::from_str::<ApiError>(&body).unwrap_or_else(|_| {
                    ApiError::new(
                        ErrorKind::from_status(code),
                        format!("the server at {} answered {code}: {}", self.base, body.trim()),
                    )
                }))
            }
            Err(ureq::Error::Transport(t)) if t.to_string().contains("peer certificate") => {
                Err(ApiError::new(
                    ErrorKind::Unreachable,
                    format!(
                        "the ferry server at {} presented a certificate this machine does not trust ({t}); pass its certificate (or its CA's) with --ca-cert FILE or FERRY_CA_CERT",
                        self.base
                    ),
                ))
            }
            Err(ureq::Error::Transport(t)) => Err(ApiError::new(
                ErrorKind::Unreachable,
                format!(
                    "cannot reach the ferry server at {} ({t}); check --server / FERRY_SERVER and that `ferry serve` runs there",
                    self.base
                ),
            )),
        }
    }

    /// GET `path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> ApiResult<T> {
        self.answer(self.request("GET", path).call())
    }

    /// GET `path`, waiting up to `wait` for an answer; `None` on 204 No Content.
    pub fn get_opt<T: DeserializeOwned>(&self, path: &str, wait: Duration) -> ApiResult<Option<T>> {
        match self.request("GET", path).timeout(wait).call() {
            Ok(r) if r.status() == 204 => Ok(None),
            r => self.answer(r).map(Some),
        }
    }

    /// POST `body` as JSON to `path`.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> ApiResult<T> {
        self.answer(self.request("POST", path).send_json(body))
    }

    /// DELETE `path`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> ApiResult<T> {
        self.answer(self.request("DELETE", path).call())
    }

    /// POSTs a request that runs a job of `vm`, following its progress meanwhile.
    fn run<B: Serialize, T: DeserializeOwned>(
        &self,
        vm: &str,
        path: &str,
        body: &B,
    ) -> ApiResult<T> {
        let Some(progress) = self.progress.clone() else {
            return self.post(path, body);
        };
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (done, me, vm) = (done.clone(), self.clone(), vm.to_string());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Ok(s) = me.status(&vm) {
                        if let Some(j) = s.job.filter(|j| j.state == ferry_model::JobState::Running)
                        {
                            progress(&j);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        let r = self.post(path, body);
        done.store(true, Ordering::Relaxed);
        let _ = watcher.join();
        r
    }
}

/// TLS of the client: the usual public roots, plus the certificates of `ca` (PEM).
fn tls_config(ca: Option<&std::path::Path>) -> ApiResult<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca {
        let bad = |e: String| {
            ApiError::bad_request(format!(
                "--ca-cert {}: {e}; give the PEM certificate of the server (or of the CA that signed it)",
                path.display()
            ))
        };
        let mut n = 0;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
        {
            roots
                .add(c.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad("no certificate in it".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn vm_path(vm: &str, op: &str) -> String {
    format!("/v1/vms/{}/{op}", segment(vm))
}

impl Api for Client {
    fn info(&self) -> ApiResult<Info> {
        self.get("/v1/info")
    }
    fn sites(&self) -> ApiResult<Vec<Site>> {
        self.get("/v1/sites")
    }
    fn add_site(&self, req: &SiteAdd) -> ApiResult<Site> {
        self.post("/v1/sites", req)
    }
    fn site(&self, name: &str) -> ApiResult<SiteView> {
        self.get(&format!("/v1/sites/{}", segment(name)))
    }
    fn map_network(&self, req: &NetworkMapReq) -> ApiResult<SiteView> {
        self.post("/v1/network-map", req)
    }
    fn hosts(&self) -> ApiResult<Vec<HostView>> {
        self.get("/v1/hosts")
    }
    fn host(&self, name: &str) -> ApiResult<HostView> {
        self.get(&format!("/v1/hosts/{}", segment(name)))
    }
    fn add_host(&self, req: &HostAdd) -> ApiResult<HostView> {
        self.post("/v1/hosts", req)
    }
    fn vms(&self) -> ApiResult<Vec<VmView>> {
        self.get("/v1/vms")
    }
    fn vm(&self, name: &str, host: Option<&str>) -> ApiResult<VmView> {
        let q = host
            .map(|h| format!("?host={}", segment(h)))
            .unwrap_or_default();
        self.get(&format!("/v1/vms/{}{q}", segment(name)))
    }
    fn create_vm(&self, req: &VmCreate) -> ApiResult<VmView> {
        self.post("/v1/vms", req)
    }
    fn set_power(&self, name: &str, req: &VmPower) -> ApiResult<VmView> {
        self.post(&vm_path(name, "power"), req)
    }
    fn protect(&self, vm: &str, req: &ProtectReq) -> ApiResult<RunReply> {
        self.run(vm, &vm_path(vm, "protect"), req)
    }
    fn replicate(&self, vm: &str, req: &ReplicateReq) -> ApiResult<RunReply> {
        self.run(vm, &vm_path(vm, "replicate"), req)
    }
    fn reverse_replicate(&self, vm: &str, req: &ReplicateReq) -> ApiResult<RunReply> {
        self.run(vm, &vm_path(vm, "reverse-replicate"), req)
    }
    fn points(&self, vm: &str) -> ApiResult<Vec<RecoveryPoint>> {
        self.get(&vm_path(vm, "points"))
    }
    fn failover(&self, vm: &str, req: &FailoverReq) -> ApiResult<RunReply> {
        self.run(vm, &vm_path(vm, "failover"), req)
    }
    fn failback(&self, vm: &str, req: &FailbackReq) -> ApiResult<RunReply> {
        self.run(vm, &vm_path(vm, "failback"), req)
    }
    fn complete(&self, vm: &str, req: &CompleteReq) -> ApiResult<RunReply> {
        self.run(vm, &vm_path(vm, "complete"), req)
    }
    fn cancel(&self, vm: &str) -> ApiResult<RunReply> {
        self.post(&vm_path(vm, "cancel"), &serde_json::json!({}))
    }
    fn commit(&self, vm: &str) -> ApiResult<RunReply> {
        self.run(vm, &vm_path(vm, "commit"), &serde_json::json!({}))
    }
    fn verify(&self, vm: &str, req: &VerifyReq) -> ApiResult<VerifyReport> {
        self.post(&vm_path(vm, "verify"), req)
    }
    fn status(&self, vm: &str) -> ApiResult<StatusView> {
        self.get(&format!("/v1/status/{}", segment(vm)))
    }
    fn statuses(&self) -> ApiResult<Vec<StatusView>> {
        self.get("/v1/status")
    }
    fn jobs(&self, all: bool) -> ApiResult<Vec<Job>> {
        self.get(&format!("/v1/jobs?all={all}"))
    }
    fn job(&self, id: i64) -> ApiResult<Job> {
        self.get(&format!("/v1/jobs/{id}"))
    }
    fn watch_job(&self, id: i64, on: JobObserver<'_>) -> ApiResult<Job> {
        let resp = self
            .request("GET", &format!("/v1/jobs/{id}/events"))
            .set("Accept", "text/event-stream")
            .call();
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return self.answer::<Job>(Err(e)),
        };
        let mut last: Option<Job> = None;
        for line in std::io::BufReader::new(resp.into_reader()).lines() {
            let line = line.map_err(|e| {
                ApiError::new(
                    ErrorKind::Unreachable,
                    format!("the event stream of job {id} from {} broke off ({e}); run `ferry job watch {id}` again", self.base),
                )
            })?;
            if let Some(data) = line.strip_prefix("data:") {
                if let Ok(j) = serde_json::from_str::<Job>(data.trim()) {
                    on(&j);
                    last = Some(j);
                }
            }
        }
        match last {
            Some(j)
                if !matches!(
                    j.state,
                    ferry_model::JobState::Running | ferry_model::JobState::Queued
                ) =>
            {
                Ok(j)
            }
            _ => self.job(id),
        }
    }
    fn create_plan(&self, req: &PlanCreate) -> ApiResult<PlanView> {
        self.post("/v1/plans", req)
    }
    fn plan(&self, name: &str) -> ApiResult<PlanView> {
        self.get(&format!("/v1/plans/{}", segment(name)))
    }
    fn run_plan(&self, name: &str, req: &PlanRunReq) -> ApiResult<PlanRun> {
        self.post(&format!("/v1/plans/{}/run", segment(name)), req)
    }
    fn resume_plan(&self, name: &str) -> ApiResult<PlanRun> {
        self.post(
            &format!("/v1/plans/{}/resume", segment(name)),
            &serde_json::json!({}),
        )
    }
    fn token_new(&self, req: &TokenNew) -> ApiResult<TokenCreated> {
        self.post("/v1/tokens", req)
    }
    fn tokens(&self) -> ApiResult<Vec<TokenInfo>> {
        self.get("/v1/tokens")
    }
    fn token_revoke(&self, name: &str) -> ApiResult<TokenInfo> {
        self.delete(&format!("/v1/tokens/{}", segment(name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_keep_names_and_escape_everything_else() {
        assert_eq!(segment("web-1.a_b"), "web-1.a_b");
        assert_eq!(segment("../etc"), "..%2Fetc");
        assert_eq!(segment("a b?x"), "a%20b%3Fx");
    }

    #[test]
    fn an_unreachable_server_is_named() {
        let c = Client::new("http://127.0.0.1:9", None).unwrap();
        let e = c.info().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unreachable);
        assert!(e.error.contains("127.0.0.1:9"), "{}", e.error);
        assert!(Client::new("localhost:7450", None).is_err());
    }
}
