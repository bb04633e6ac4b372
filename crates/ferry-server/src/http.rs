//! The REST API of `ferry serve`: one route per operation of [`Api`], each behind a bearer
//! token whose role must allow it; the OpenAPI document at `/openapi.json`; job progress as
//! server-sent events. Every handler runs the same [`Local`] code embedded mode runs.
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_api::*;
use ferry_model::{JobState, Role};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::agents::Hub;
use crate::local::{token_hash, Local};
use std::sync::Arc;

/// Largest request body the server reads (every request is small metadata).
pub const BODY_LIMIT: usize = 1 << 20;
/// Largest answer an agent may send (block maps travel in them: 64 B of hex per block).
pub const AGENT_RESULT_LIMIT: usize = 256 << 20;

/// State shared by the handlers.
#[derive(Clone)]
pub struct Srv {
    /// The operations, over the server's home.
    pub local: Local,
    /// Work for agents.
    pub hub: Arc<Hub>,
}

/// An [`ApiError`] as an HTTP response: its kind's status and `{"kind","error"}`.
pub struct Fail(pub ApiError);

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

/// A JSON request body; anything unreadable (malformed, unknown field, too large, not JSON)
/// is a 400 (413 when too large) with a message, never a panic.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Fail;

    async fn from_request(req: Request, state: &S) -> Result<Self, Fail> {
        let bad = |m: String| Fail(ApiError::bad_request(format!("bad request: {m}")));
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(Fail(ApiError::new(
                    ErrorKind::TooLarge,
                    format!("bad request: the body is larger than the server accepts ({BODY_LIMIT} bytes)"),
                )))
            }
            Err(r) => return Err(bad(r.body_text())),
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("the body is not JSON ({e})")))?;
        if !v.is_object() {
            return Err(bad("the body must be a JSON object".into()));
        }
        serde_json::from_value(v)
            .map(Body)
            .map_err(|e| bad(e.to_string()))
    }
}

type Reply<T> = Result<Json<T>, Fail>;

fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    ferry_model::validate_name(kind, name).map_err(|e| ApiError::bad_request(e.to_string()))
}

impl Srv {
    /// The token of a request, if its role allows `needed`.
    fn authorize(&self, headers: &HeaderMap, needed: Role) -> ApiResult<TokenInfo> {
        let secret = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Unauthorized,
                    "no token: pass --token TOKEN or set FERRY_TOKEN (an admin creates one with `ferry token new NAME --role operator`)",
                )
            })?;
        let vault = ferry_vault::Vault::open(self.local.home())
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        let t = vault
            .token_by_hash(&token_hash(secret))
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Unauthorized,
                    "token rejected: the server knows no such token (revoked, or from another installation?); ask an admin for one (`ferry token new NAME --role ROLE`)",
                )
            })?;
        if !t.role.allows(needed) {
            return Err(ApiError::new(
                ErrorKind::Forbidden,
                format!(
                    "token {} has role {}, and this request needs role {}; nothing was changed",
                    t.name,
                    t.role.as_str(),
                    needed.as_str()
                ),
            ));
        }
        Ok(t)
    }

    /// The token of an agent's request, if it is an agent token for `host`.
    fn authorize_agent(&self, headers: &HeaderMap, host: &str) -> ApiResult<TokenInfo> {
        let t = self.authorize(headers, Role::Agent).map_err(|e| match e.kind {
            ErrorKind::Forbidden => ApiError::new(
                ErrorKind::Forbidden,
                format!("this request is for agents: it needs role agent, with a token for host {host} (`ferry token new NAME --role agent --host {host}`)"),
            ),
            _ => e,
        })?;
        if t.host.as_deref() != Some(host) {
            return Err(ApiError::new(
                ErrorKind::Forbidden,
                format!(
                    "token {} acts as host {}, not {host}; nothing was changed",
                    t.name,
                    t.host.as_deref().unwrap_or("-")
                ),
            ));
        }
        Ok(t)
    }

    /// Authorizes an agent of `host`, then runs `f` on a blocking thread.
    async fn call_agent<T: Serialize + Send + 'static>(
        &self,
        headers: HeaderMap,
        host: String,
        f: impl FnOnce(&Srv) -> ApiResult<T> + Send + 'static,
    ) -> Reply<T> {
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            check_name("host", &host)?;
            me.authorize_agent(&headers, &host)?;
            f(&me)
        })
        .await;
        match r {
            Ok(Ok(v)) => Ok(Json(v)),
            Ok(Err(e)) => Err(Fail(e)),
            Err(j) => Err(Fail(ApiError::new(
                ErrorKind::Internal,
                format!("internal error ({j}); this is a bug: the server's log has the details"),
            ))),
        }
    }

    /// Authorizes, then runs `f` on a blocking thread (the engine is synchronous).
    async fn call<T: Serialize + Send + 'static>(
        &self,
        headers: HeaderMap,
        needed: Role,
        f: impl FnOnce(&Local) -> ApiResult<T> + Send + 'static,
    ) -> Reply<T> {
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            me.authorize(&headers, needed)?;
            f(&me.local)
        })
        .await;
        match r {
            Ok(Ok(v)) => Ok(Json(v)),
            Ok(Err(e)) => Err(Fail(e)),
            Err(j) => Err(Fail(ApiError::new(
                ErrorKind::Internal,
                format!("internal error ({j}); this is a bug: the server's log has the details"),
            ))),
        }
    }
}

/// Query of `GET /v1/vms/{vm}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HostQuery {
    /// The copy on this host (default: the active copy).
    pub host: Option<String>,
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    /// Include finished jobs.
    #[serde(default)]
    pub all: bool,
}

macro_rules! vm_op {
    ($fn:ident, $op:literal, $req:ty, $resp:ty, $role:expr, $method:ident, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = concat!("/v1/vms/{vm}/", $op), tag = "lifecycle",
            params(("vm" = String, Path, description = "VM name")),
            request_body = $req, responses((status = 200, body = $resp), (status = "4XX", body = ApiError)),
            security(("token" = [])))]
        async fn $fn(
            State(s): State<Srv>,
            headers: HeaderMap,
            Path(vm): Path<String>,
            Body(req): Body<$req>,
        ) -> Reply<$resp> {
            s.call(headers, $role, move |api| {
                check_name("VM", &vm)?;
                api.$method(&vm, &req)
            })
            .await
        }
    };
}

/// An empty request body (`{}`).
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

vm_op!(
    protect,
    "protect",
    ProtectReq,
    RunReply,
    Role::Operator,
    protect,
    "Enables replication and takes the first recovery point."
);
vm_op!(
    replicate,
    "replicate",
    ReplicateReq,
    RunReply,
    Role::Operator,
    replicate,
    "Runs one replication cycle now."
);
vm_op!(
    reverse_replicate,
    "reverse-replicate",
    ReplicateReq,
    RunReply,
    Role::Operator,
    reverse_replicate,
    "Protects a failed-back VM again, sending only changes."
);
vm_op!(
    failover,
    "failover",
    FailoverReq,
    RunReply,
    Role::Operator,
    failover,
    "Fails a VM over to its recovery site."
);
vm_op!(
    failback,
    "failback",
    FailbackReq,
    RunReply,
    Role::Operator,
    failback,
    "Fails a VM back (phase 1 of a delta sync, or a full download), or predicts it."
);
vm_op!(
    complete,
    "complete",
    CompleteReq,
    RunReply,
    Role::Operator,
    complete,
    "Phase 2 of a waiting failback."
);
vm_op!(
    verify,
    "verify",
    VerifyReq,
    VerifyReport,
    Role::Operator,
    verify,
    "Reads back every block of a recovery point."
);
vm_op!(
    power,
    "power",
    VmPower,
    VmView,
    Role::Operator,
    set_power,
    "Starts or stops a VM copy."
);

macro_rules! vm_plain_op {
    ($fn:ident, $op:literal, $method:ident, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = concat!("/v1/vms/{vm}/", $op), tag = "lifecycle",
            params(("vm" = String, Path, description = "VM name")),
            request_body = Empty, responses((status = 200, body = RunReply), (status = "4XX", body = ApiError)),
            security(("token" = [])))]
        async fn $fn(
            State(s): State<Srv>,
            headers: HeaderMap,
            Path(vm): Path<String>,
            Body(_): Body<Empty>,
        ) -> Reply<RunReply> {
            s.call(headers, Role::Operator, move |api| {
                check_name("VM", &vm)?;
                api.$method(&vm)
            })
            .await
        }
    };
}

vm_plain_op!(
    cancel,
    "cancel",
    cancel,
    "Cancels the running or waiting job of a VM."
);
vm_plain_op!(commit, "commit", commit, "Commits a failover or failback.");

/// The installation.
#[utoipa::path(get, path = "/v1/info", tag = "inventory", responses((status = 200, body = Info)), security(("token" = [])))]
async fn info(State(s): State<Srv>, headers: HeaderMap) -> Reply<Info> {
    s.call(headers, Role::Viewer, |api| api.info()).await
}

/// Every site.
#[utoipa::path(get, path = "/v1/sites", tag = "inventory", responses((status = 200, body = Vec<Site>)), security(("token" = [])))]
async fn sites(State(s): State<Srv>, headers: HeaderMap) -> Reply<Vec<Site>> {
    s.call(headers, Role::Viewer, |api| api.sites()).await
}

/// Adds a site.
#[utoipa::path(post, path = "/v1/sites", tag = "inventory", request_body = SiteAdd, responses((status = 200, body = Site), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn add_site(
    State(s): State<Srv>,
    headers: HeaderMap,
    Body(req): Body<SiteAdd>,
) -> Reply<Site> {
    s.call(headers, Role::Admin, move |api| {
        check_name("site", &req.name)?;
        api.add_site(&req)
    })
    .await
}

/// One site with its network map.
#[utoipa::path(get, path = "/v1/sites/{name}", tag = "inventory", params(("name" = String, Path, description = "site name")), responses((status = 200, body = SiteView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn site(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<SiteView> {
    s.call(headers, Role::Viewer, move |api| {
        check_name("site", &name)?;
        api.site(&name)
    })
    .await
}

/// Maps a switch of one site to a switch of another (both ways).
#[utoipa::path(post, path = "/v1/network-map", tag = "inventory", request_body = NetworkMapReq, responses((status = 200, body = SiteView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn map_network(
    State(s): State<Srv>,
    headers: HeaderMap,
    Body(req): Body<NetworkMapReq>,
) -> Reply<SiteView> {
    s.call(headers, Role::Admin, move |api| {
        check_name("site", &req.site)?;
        check_name("site", &req.to_site)?;
        api.map_network(&req)
    })
    .await
}

/// Every host with its connection state.
#[utoipa::path(get, path = "/v1/hosts", tag = "inventory", responses((status = 200, body = Vec<HostView>)), security(("token" = [])))]
async fn hosts(State(s): State<Srv>, headers: HeaderMap) -> Reply<Vec<HostView>> {
    s.call(headers, Role::Viewer, |api| api.hosts()).await
}

/// One host.
#[utoipa::path(get, path = "/v1/hosts/{name}", tag = "inventory", params(("name" = String, Path, description = "host name")), responses((status = 200, body = HostView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn host(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<HostView> {
    s.call(headers, Role::Viewer, move |api| {
        check_name("host", &name)?;
        api.host(&name)
    })
    .await
}

/// Adds a host.
#[utoipa::path(post, path = "/v1/hosts", tag = "inventory", request_body = HostAdd, responses((status = 200, body = HostView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn add_host(
    State(s): State<Srv>,
    headers: HeaderMap,
    Body(req): Body<HostAdd>,
) -> Reply<HostView> {
    s.call(headers, Role::Admin, move |api| {
        check_name("host", &req.name)?;
        api.add_host(&req)
    })
    .await
}

/// Every VM on every connected host.
#[utoipa::path(get, path = "/v1/vms", tag = "inventory", responses((status = 200, body = Vec<VmView>)), security(("token" = [])))]
async fn vms(State(s): State<Srv>, headers: HeaderMap) -> Reply<Vec<VmView>> {
    s.call(headers, Role::Viewer, |api| api.vms()).await
}

/// One VM copy (the active one unless `host` is given).
#[utoipa::path(get, path = "/v1/vms/{vm}", tag = "inventory", params(("vm" = String, Path, description = "VM name"), HostQuery), responses((status = 200, body = VmView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn vm(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(vm): Path<String>,
    Query(q): Query<HostQuery>,
) -> Reply<VmView> {
    s.call(headers, Role::Viewer, move |api| {
        check_name("VM", &vm)?;
        api.vm(&vm, q.host.as_deref())
    })
    .await
}

/// Creates a VM.
#[utoipa::path(post, path = "/v1/vms", tag = "inventory", request_body = VmCreate, responses((status = 200, body = VmView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn create_vm(
    State(s): State<Srv>,
    headers: HeaderMap,
    Body(req): Body<VmCreate>,
) -> Reply<VmView> {
    s.call(headers, Role::Admin, move |api| {
        check_name("VM", &req.name)?;
        api.create_vm(&req)
    })
    .await
}

/// Recovery points of a VM, newest first.
#[utoipa::path(get, path = "/v1/vms/{vm}/points", tag = "lifecycle", params(("vm" = String, Path, description = "VM name")), responses((status = 200, body = Vec<RecoveryPoint>), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn points(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> Reply<Vec<RecoveryPoint>> {
    s.call(headers, Role::Viewer, move |api| {
        check_name("VM", &vm)?;
        api.points(&vm)
    })
    .await
}

/// State of every protected VM.
#[utoipa::path(get, path = "/v1/status", tag = "lifecycle", responses((status = 200, body = Vec<StatusView>)), security(("token" = [])))]
async fn statuses(State(s): State<Srv>, headers: HeaderMap) -> Reply<Vec<StatusView>> {
    s.call(headers, Role::Viewer, |api| api.statuses()).await
}

/// State of one VM.
#[utoipa::path(get, path = "/v1/status/{vm}", tag = "lifecycle", params(("vm" = String, Path, description = "VM name")), responses((status = 200, body = StatusView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn status(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> Reply<StatusView> {
    s.call(headers, Role::Viewer, move |api| {
        check_name("VM", &vm)?;
        api.status(&vm)
    })
    .await
}

/// Unfinished jobs, or every job with `all=true`.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobsQuery), responses((status = 200, body = Vec<Job>)), security(("token" = [])))]
async fn jobs(
    State(s): State<Srv>,
    headers: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Reply<Vec<Job>> {
    s.call(headers, Role::Viewer, move |api| api.jobs(q.all))
        .await
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = i64, Path, description = "job id")), responses((status = 200, body = Job), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn job(State(s): State<Srv>, headers: HeaderMap, Path(id): Path<i64>) -> Reply<Job> {
    s.call(headers, Role::Viewer, move |api| api.job(id)).await
}

/// A job's snapshots as server-sent events (`data: JOB` whenever it changes) until it is no
/// longer running; the last event is its final (or waiting) state.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = i64, Path, description = "job id")), responses((status = 200, description = "text/event-stream of Job documents", content_type = "text/event-stream"), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn job_events(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, Fail> {
    let _ = s
        .call(headers, Role::Viewer, move |api| api.job(id))
        .await?;
    let stream = futures::stream::unfold(
        (s, None::<String>, false),
        move |(s, last, done)| async move {
            if done {
                return None;
            }
            loop {
                let local = s.local.clone();
                let j = tokio::task::spawn_blocking(move || local.job(id)).await;
                let Ok(Ok(job)) = j else { return None };
                let text = serde_json::to_string(&job).ok()?;
                let end = !matches!(job.state, JobState::Running | JobState::Queued);
                if end || last.as_deref() != Some(text.as_str()) {
                    let ev = Event::default().data(text.clone());
                    return Some((Ok(ev), (s, Some(text), end)));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Creates a recovery plan.
#[utoipa::path(post, path = "/v1/plans", tag = "plans", request_body = PlanCreate, responses((status = 200, body = PlanView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn create_plan(
    State(s): State<Srv>,
    headers: HeaderMap,
    Body(req): Body<PlanCreate>,
) -> Reply<PlanView> {
    // Pre and post steps are shell commands the server runs as itself: an admin's to give.
    let role = if req
        .steps
        .iter()
        .any(|s| s.pre.is_some() || s.post.is_some())
    {
        Role::Admin
    } else {
        Role::Operator
    };
    s.call(headers, role, move |api| {
        check_name("plan", &req.name)?;
        api.create_plan(&req)
    })
    .await
}

/// One plan.
#[utoipa::path(get, path = "/v1/plans/{name}", tag = "plans", params(("name" = String, Path, description = "plan name")), responses((status = 200, body = PlanView), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn plan(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<PlanView> {
    s.call(headers, Role::Viewer, move |api| {
        check_name("plan", &name)?;
        api.plan(&name)
    })
    .await
}

/// Runs a plan action on every VM, group by group.
#[utoipa::path(post, path = "/v1/plans/{name}/run", tag = "plans", params(("name" = String, Path, description = "plan name")), request_body = PlanRunReq, responses((status = 200, body = PlanRun), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn run_plan(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Body(req): Body<PlanRunReq>,
) -> Reply<PlanRun> {
    s.call(headers, Role::Operator, move |api| {
        check_name("plan", &name)?;
        api.run_plan(&name, &req)
    })
    .await
}

/// Continues a plan run that stopped at a group's pause.
#[utoipa::path(post, path = "/v1/plans/{name}/resume", tag = "plans", params(("name" = String, Path, description = "plan name")), responses((status = 200, body = PlanRun), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn resume_plan(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<PlanRun> {
    s.call(headers, Role::Operator, move |api| {
        check_name("plan", &name)?;
        api.resume_plan(&name)
    })
    .await
}

/// Every token (names and roles; never secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", responses((status = 200, body = Vec<TokenInfo>), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn tokens(State(s): State<Srv>, headers: HeaderMap) -> Reply<Vec<TokenInfo>> {
    s.call(headers, Role::Admin, |api| api.tokens()).await
}

/// Creates a token; the answer holds its secret, which is shown only here.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = TokenNew, responses((status = 200, body = TokenCreated), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn token_new(
    State(s): State<Srv>,
    headers: HeaderMap,
    Body(req): Body<TokenNew>,
) -> Reply<TokenCreated> {
    s.call(headers, Role::Admin, move |api| {
        check_name("token", &req.name)?;
        api.token_new(&req)
    })
    .await
}

/// Revokes a token.
#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "tokens", params(("name" = String, Path, description = "token name")), responses((status = 200, body = TokenInfo), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn token_revoke(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<TokenInfo> {
    s.call(headers, Role::Admin, move |api| {
        check_name("token", &name)?;
        api.token_revoke(&name)
    })
    .await
}

/// Query of the agent endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AgentQuery {
    /// The host the agent serves.
    pub host: String,
}

/// An agent's heartbeat (its first registers it): the host as the control plane knows it.
#[utoipa::path(post, path = "/v1/agent/heartbeat", tag = "agents", request_body = AgentHello, responses((status = 200, body = AgentWelcome), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn agent_heartbeat(
    State(s): State<Srv>,
    headers: HeaderMap,
    Body(req): Body<AgentHello>,
) -> Reply<AgentWelcome> {
    s.call_agent(headers, req.host.clone(), move |s| {
        let v = ferry_vault::Vault::open(s.local.home()).map_err(|e| ApiError::refused(e.to_string()))?;
        let name = &req.host;
        let host = v
            .host(name)
            .map_err(|e| ApiError::refused(e.to_string()))?
            .ok_or_else(|| ApiError::refused(format!("no host named {name}; declare it with `ferry host add {name} --site SITE --driver {} --agent`", req.driver.as_str())))?;
        if !host.agent {
            return Err(ApiError::refused(format!("host {name} is driven by the control plane itself, not by an agent; declare agent hosts with `ferry host add NAME … --agent`")));
        }
        if host.driver != req.driver {
            return Err(ApiError::refused(format!("host {name} is declared with driver {}, and this agent runs {}; start it with --driver {}", host.driver.as_str(), req.driver.as_str(), host.driver.as_str())));
        }
        s.hub.heartbeat(name, req.session.as_deref());
        let first = v.agent(name).ok().flatten().is_none();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        v.agent_seen(name, &ferry_vault::AgentInfo { last_seen: now, version: req.version.clone(), driver: req.driver.as_str().into(), root: req.root.clone() })
            .map_err(|e| ApiError::refused(e.to_string()))?;
        if first {
            tracing::info!("agent of host {name} registered (ferry {}, root {})", req.version, req.root);
        }
        let host = v.host(name).map_err(|e| ApiError::refused(e.to_string()))?.expect("exists");
        Ok(AgentWelcome { host, timeout_s: s.hub.timeout.as_secs() })
    })
    .await
}

/// The next task for an agent; waits up to 20 s, then answers 204 (ask again).
#[utoipa::path(get, path = "/v1/agent/tasks", tag = "agents", params(AgentQuery), responses((status = 200, body = AgentTask), (status = 204, description = "no work yet: ask again"), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn agent_task(
    State(s): State<Srv>,
    headers: HeaderMap,
    Query(q): Query<AgentQuery>,
) -> Result<Response, Fail> {
    let host = q.host.clone();
    let _ = s.call_agent(headers, host.clone(), |_| Ok(())).await?;
    Ok(match s.hub.next_task(&host).await {
        Some(t) => Json(t).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// An agent's answer to task `id`.
#[utoipa::path(post, path = "/v1/agent/tasks/{id}", tag = "agents", params(("id" = u64, Path, description = "task id"), AgentQuery), request_body = AgentResult, responses((status = 200, body = Empty), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn agent_result(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<AgentQuery>,
    Body(r): Body<AgentResult>,
) -> Reply<Empty> {
    s.call_agent(headers, q.host.clone(), move |s| {
        if s.hub.resolve(id, &q.host, r) {
            Ok(Empty {})
        } else {
            Err(ApiError::refused(format!(
                "no task {id} of host {} is waiting (it timed out, or the server restarted)",
                q.host
            )))
        }
    })
    .await
}

/// An agent's progress report on task `id` (a data operation): totals so far. The answer
/// says whether to stop.
#[utoipa::path(post, path = "/v1/agent/tasks/{id}/progress", tag = "agents", params(("id" = u64, Path, description = "task id"), AgentQuery), request_body = AgentCounters, responses((status = 200, body = AgentProgressReply), (status = "4XX", body = ApiError)), security(("token" = [])))]
async fn agent_progress(
    State(s): State<Srv>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<AgentQuery>,
    Body(c): Body<AgentCounters>,
) -> Reply<AgentProgressReply> {
    s.call_agent(headers, q.host.clone(), move |s| {
        Ok(s.hub.progress(id, &q.host, c))
    })
    .await
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of the API (served at `/openapi.json`, checked in as
/// `docs/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(title = "ferry", description = "Site recovery for virtual machines: the control plane's REST API. Every request but /openapi.json needs `Authorization: Bearer TOKEN`."),
    paths(info, sites, add_site, site, map_network, hosts, host, add_host, vms, vm, create_vm, power, points,
          protect, replicate, reverse_replicate, failover, failback, complete, cancel, commit, verify,
          statuses, status, jobs, job, job_events, create_plan, plan, run_plan, resume_plan,
          tokens, token_new, token_revoke, agent_heartbeat, agent_task, agent_result, agent_progress),
    components(schemas(ApiError, ErrorKind, Empty, AgentDataReply)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    // The version is the API's, not each build's.
    doc.info.version = "1".into();
    doc.to_pretty_json()
        .expect("the OpenAPI document serializes")
        + "\n"
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

async fn not_found(req: Request) -> Fail {
    Fail(ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no such endpoint: {} {}; the API is described at /openapi.json",
            req.method(),
            req.uri().path()
        ),
    ))
}

async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t = Instant::now();
    let resp = next.run(req).await;
    tracing::info!(
        "{method} {path} -> {} in {} ms",
        resp.status().as_u16(),
        t.elapsed().as_millis()
    );
    resp
}

/// The whole API as a router.
pub fn router(srv: Srv) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/info", get(info))
        .route("/v1/sites", get(sites).post(add_site))
        .route("/v1/sites/{name}", get(site))
        .route("/v1/network-map", post(map_network))
        .route("/v1/hosts", get(hosts).post(add_host))
        .route("/v1/hosts/{name}", get(host))
        .route("/v1/vms", get(vms).post(create_vm))
        .route("/v1/vms/{vm}", get(vm))
        .route("/v1/vms/{vm}/power", post(power))
        .route("/v1/vms/{vm}/points", get(points))
        .route("/v1/vms/{vm}/protect", post(protect))
        .route("/v1/vms/{vm}/replicate", post(replicate))
        .route("/v1/vms/{vm}/reverse-replicate", post(reverse_replicate))
        .route("/v1/vms/{vm}/failover", post(failover))
        .route("/v1/vms/{vm}/failback", post(failback))
        .route("/v1/vms/{vm}/complete", post(complete))
        .route("/v1/vms/{vm}/cancel", post(cancel))
        .route("/v1/vms/{vm}/commit", post(commit))
        .route("/v1/vms/{vm}/verify", post(verify))
        .route("/v1/status", get(statuses))
        .route("/v1/status/{vm}", get(status))
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/plans", post(create_plan))
        .route("/v1/plans/{name}", get(plan))
        .route("/v1/plans/{name}/run", post(run_plan))
        .route("/v1/plans/{name}/resume", post(resume_plan))
        .route("/v1/tokens", get(tokens).post(token_new))
        .route("/v1/tokens/{name}", axum::routing::delete(token_revoke))
        .route("/v1/agent/heartbeat", post(agent_heartbeat))
        .route("/v1/agent/tasks", get(agent_task))
        .route(
            "/v1/agent/tasks/{id}",
            post(agent_result).layer(DefaultBodyLimit::max(AGENT_RESULT_LIMIT)),
        )
        .route("/v1/agent/tasks/{id}/progress", post(agent_progress))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(srv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::Api;
    use proptest::prelude::*;

    /// A router over a fresh installation, and an admin token for it.
    fn app() -> (tempfile::TempDir, Router, String) {
        let dir = tempfile::tempdir().unwrap();
        ferry_engine::Engine::init(dir.path()).unwrap();
        let local = Local::new(dir.path());
        let token = local
            .token_new(&ferry_api::TokenNew {
                name: "fuzz".into(),
                role: ferry_api::Role::Admin,
                host: None,
            })
            .unwrap()
            .token;
        let hub = Arc::new(Hub::new(
            dir.path().to_path_buf(),
            crate::agents::AGENT_TIMEOUT,
        ));
        (dir, router(Srv { local, hub }), token)
    }

    const ENDPOINTS: &[&str] = &[
        "/v1/sites",
        "/v1/hosts",
        "/v1/vms",
        "/v1/vms/app/power",
        "/v1/vms/app/protect",
        "/v1/vms/app/failover",
        "/v1/vms/app/failback",
        "/v1/vms/app/complete",
        "/v1/vms/app/verify",
        "/v1/plans",
        "/v1/plans/p/run",
        "/v1/tokens",
        "/v1/agent/heartbeat",
        "/v1/agent/tasks/1?host=h1",
    ];

    /// A body: random bytes, or JSON that is nearly right (known field names, random values).
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let value = prop_oneof![
            Just("null".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[a-z./]{0,12}".prop_map(|s| format!("{s:?}")),
            Just("{}".to_string()),
            Just("[]".to_string()),
        ];
        let field = prop_oneof![
            Just("name"),
            Just("role"),
            Just("store"),
            Just("site"),
            Just("driver"),
            Just("to"),
            Just("mode"),
            Just("host"),
            Just("sync"),
            Just("key"),
            Just("point"),
            Just("groups"),
            Just("action"),
            Just("disks"),
            Just("rpo_s"),
            Just("data"),
            Just("version"),
            Just("x"),
        ];
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec((field, value), 0..4).prop_map(|kv| {
                let inner: Vec<String> = kv.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
                format!("{{{}}}", inner.join(", ")).into_bytes()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        // Any body to any endpoint: an answer below 500 with a message, never a panic.
        #[test]
        fn any_body_to_any_endpoint_is_answered_below_500(
            at in 0..ENDPOINTS.len(),
            b in body(),
        ) {
            use tower::ServiceExt;
            let (_dir, app, token) = app();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let req = axum::http::Request::post(ENDPOINTS[at])
                .header("Authorization", format!("Bearer {token}"))
                .header("Content-Type", "application/json")
                .body(axum::body::Body::from(b.clone()))
                .unwrap();
            let resp = rt.block_on(app.oneshot(req)).unwrap();
            let status = resp.status().as_u16();
            prop_assert!(status < 500, "{} {:?}: {status}", ENDPOINTS[at], String::from_utf8_lossy(&b));
            if status >= 400 {
                let bytes = rt
                    .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
                    .unwrap();
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                prop_assert!(v["error"].is_string(), "{v}");
            }
        }
    }

    /// `docs/openapi.json` is the API as built; regenerate it with
    /// `FERRY_UPDATE_OPENAPI=1 cargo test -p ferry-server openapi`.
    #[test]
    fn the_checked_in_openapi_document_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let now = openapi_json();
        if std::env::var_os("FERRY_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &now).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == now,
            "docs/openapi.json differs from the API in the code; regenerate it with `FERRY_UPDATE_OPENAPI=1 cargo test -p ferry-server openapi` and commit it"
        );
    }

    #[test]
    fn every_route_of_the_router_is_in_the_document() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/vms/{vm}/failback",
            "/v1/vms/{vm}/cancel",
            "/v1/jobs/{id}/events",
            "/v1/tokens/{name}",
            "/v1/plans/{name}/run",
            "/v1/plans/{name}/resume",
        ] {
            assert!(
                paths.contains_key(p),
                "{p} missing from the OpenAPI document"
            );
        }
        assert_eq!(paths.len(), 34, "{:?}", paths.keys().collect::<Vec<_>>());
    }
}
