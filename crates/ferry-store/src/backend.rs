//! Object-store backends selected by URL.
//!
//! - `file:///abs/dir`: a local folder.
//! - `az://CONTAINER[/prefix]`: Azure Blob, configured by `AZURE_STORAGE_ACCOUNT_NAME` and
//!   `AZURE_STORAGE_ACCOUNT_KEY` (or a SAS token, bearer token, service principal, managed
//!   identity: every `AZURE_*` variable `object_store` knows). `AZURE_STORAGE_USE_EMULATOR=true`
//!   selects Azurite at 127.0.0.1:10000 (`AZURITE_BLOB_STORAGE_URL` overrides) with its
//!   well-known account.
//! - `s3://BUCKET[/prefix]`: S3, configured by `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_SESSION_TOKEN`, `AWS_REGION` (default `us-east-1`) and every other `AWS_*` variable
//!   `object_store` knows; `AWS_ENDPOINT_URL` points at a local or non-AWS server (plain
//!   `http://` is then allowed).
//!
//! A `/prefix` keeps several stores apart in one container or bucket.
//!
//! The container or bucket is created when missing. Requests are retried with exponential
//! backoff on transient errors (connection failures, 5xx) for at most [`RETRY_TIMEOUT`], so a
//! dead server fails a command in seconds, not minutes (`FERRY_STORE_RETRY_SECS` changes that
//! budget). `AZURE_TIMEOUT` / `AWS_TIMEOUT`
//! (e.g. `300s`) override the per-request timeout ([`REQUEST_TIMEOUT`]) on slow links.
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::azure::{AzureAuthorizer, AzureConfigKey, MicrosoftAzureBuilder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOpts, PutOptions, PutPayload, PutResult, RetryConfig,
};

use crate::{Result, StoreError};

/// Longest time a request is retried before its error is reported.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-request timeout (a 16 MiB pack must upload within it); `AZURE_TIMEOUT` / `AWS_TIMEOUT`
/// override it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Connection timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for credentials from a metadata service before giving up.
const CREDENTIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// The Azurite account (public, documented by Microsoft).
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_URL: &str = "http://127.0.0.1:10000";

/// Checks that `url` is a store URL ferry understands (scheme, absolute folder, container or
/// bucket name) without reaching the store.
pub fn check_store_url(url: &str) -> Result<()> {
    if let Some(path) = url.strip_prefix("file://") {
        return if path.starts_with('/') {
            Ok(())
        } else {
            Err(StoreError::Url(url.into()))
        };
    }
    if let Some(rest) = url.strip_prefix("az://") {
        return split_name(url, rest, check_container_name).map(|_| ());
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        return split_name(url, rest, check_bucket_name).map(|_| ());
    }
    Err(StoreError::Url(url.into()))
}

/// Opens the object store behind `url`, creating the folder, container or bucket if missing.
///
/// `file:///abs/dir` is a local folder; `az://CONTAINER[/prefix]` Azure Blob (or Azurite);
/// `s3://BUCKET[/prefix]` S3 (or any S3 API server). See the module docs for configuration.
pub async fn open(url: &str) -> Result<Arc<dyn ObjectStore>> {
    if let Some(path) = url.strip_prefix("file://") {
        return open_local(url, path);
    }
    if let Some(rest) = url.strip_prefix("az://") {
        let (container, prefix) = split_name(url, rest, check_container_name)?;
        return open_azure(url, container, prefix).await;
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = split_name(url, rest, check_bucket_name)?;
        return open_s3(url, bucket, prefix).await;
    }
    Err(StoreError::Url(url.into()))
}

fn open_local(url: &str, path: &str) -> Result<Arc<dyn ObjectStore>> {
    if !path.starts_with('/') {
        return Err(StoreError::Url(url.into()));
    }
    std::fs::create_dir_all(path).map_err(|e| StoreError::Backend {
        url: url.into(),
        cause: object_store::Error::Generic {
            store: "local",
            source: Box::new(e),
        },
    })?;
    let fs = object_store::local::LocalFileSystem::new_with_prefix(path).map_err(|e| {
        StoreError::Backend {
            url: url.into(),
            cause: e,
        }
    })?;
    Ok(Arc::new(fs))
}

// ---------------------------------------------------------------------------------------------
// URL and name checks
// ---------------------------------------------------------------------------------------------

/// Splits `NAME[/prefix]`, checking the name.
fn split_name<'a>(
    url: &str,
    rest: &'a str,
    check: fn(&str) -> std::result::Result<(), String>,
) -> Result<(&'a str, Option<&'a str>)> {
    let (name, prefix) = match rest.split_once('/') {
        Some((n, p)) => (n, Some(p.trim_matches('/')).filter(|p| !p.is_empty())),
        None => (rest, None),
    };
    check(name).map_err(|why| config_error(url, "config", why))?;
    Ok((name, prefix))
}

/// Azure container names: 3-63 characters, lowercase letters, digits and single hyphens,
/// starting and ending with a letter or digit.
fn check_container_name(n: &str) -> std::result::Result<(), String> {
    let ok = (3..=63).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid Azure container name {n:?}: use 3-63 lowercase letters, digits and single \
             hyphens, starting and ending with a letter or digit (e.g. az://ferry-replicas)"
        ))
    }
}

/// S3 bucket names: 3-63 characters, lowercase letters, digits, hyphens and dots, starting and
/// ending with a letter or digit.
fn check_bucket_name(n: &str) -> std::result::Result<(), String> {
    let ok = (3..=63).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !n.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid S3 bucket name {n:?}: use 3-63 lowercase letters, digits, hyphens and dots, \
             starting and ending with a letter or digit (e.g. s3://ferry-replicas)"
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Shared client settings and errors
// ---------------------------------------------------------------------------------------------

/// Retries with jittered exponential backoff: about 10 s of attempts in all (a server restart
/// or a network blip of a few seconds is ridden out, a dead server fails the command soon),
/// never more than [`RETRY_TIMEOUT`].
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
            base: 2.0,
        },
        max_retries: 12,
        retry_timeout: retry_budget(),
    }
}

/// How long a store operation keeps retrying: [`RETRY_TIMEOUT`], or `FERRY_STORE_RETRY_SECS`
/// (a link known to drop for longer may want more; tests want less).
pub fn retry_budget() -> Duration {
    std::env::var("FERRY_STORE_RETRY_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(RETRY_TIMEOUT)
}

/// A store-level error with a message of ours (`store` names the service in the message).
fn config_error(url: &str, store: &'static str, msg: String) -> StoreError {
    StoreError::Config {
        url: url.into(),
        msg: format!("{store}: {msg}"),
    }
}

/// An error and its causes on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// What the user should check when a service is unreachable or refuses the credentials.
struct Hints {
    store: &'static str,
    unreachable: String,
    auth: String,
}

fn truthy(v: Option<String>) -> bool {
    matches!(
        v.as_deref().map(str::to_ascii_lowercase).as_deref(),
        Some("true" | "1" | "yes" | "on" | "y")
    )
}

// ---------------------------------------------------------------------------------------------
// Azure Blob
// ---------------------------------------------------------------------------------------------

async fn open_azure(
    url: &str,
    container: &str,
    prefix: Option<&str>,
) -> Result<Arc<dyn ObjectStore>> {
    let mut b = MicrosoftAzureBuilder::from_env()
        .with_container_name(container)
        .with_retry(retry_config());
    let emulator = truthy(std::env::var("AZURE_STORAGE_USE_EMULATOR").ok())
        || truthy(b.get_config_value(&AzureConfigKey::UseEmulator));
    if emulator {
        b = b.with_use_emulator(true);
    }
    b = with_default_timeouts_az(b);
    let account = b
        .get_config_value(&AzureConfigKey::AccountName)
        .or_else(|| emulator.then(|| EMULATOR_ACCOUNT.to_string()));
    let emulator_base = std::env::var("AZURITE_BLOB_STORAGE_URL")
        .unwrap_or_else(|_| EMULATOR_URL.into())
        .trim_end_matches('/')
        .to_string();
    let endpoint = if emulator {
        format!(
            "{emulator_base}/{}",
            account.as_deref().unwrap_or(EMULATOR_ACCOUNT)
        )
    } else if let Some(e) = b.get_config_value(&AzureConfigKey::Endpoint) {
        e.trim_end_matches('/').to_string()
    } else if truthy(b.get_config_value(&AzureConfigKey::UseFabricEndpoint)) {
        format!(
            "https://{}.blob.fabric.microsoft.com",
            account.as_deref().unwrap_or("ACCOUNT")
        )
    } else {
        format!(
            "https://{}.blob.core.windows.net",
            account.as_deref().unwrap_or("ACCOUNT")
        )
    };
    let hints = Hints {
        store: "Azure Blob",
        unreachable: if emulator {
            format!(
                "is Azurite running at {emulator_base}? start it with `scripts/services.sh \
                 start` (or `azurite-blob --blobHost 127.0.0.1 --blobPort 10000 \
                 --skipApiVersionCheck --loose`); AZURITE_BLOB_STORAGE_URL overrides the address"
            )
        } else {
            "check the network and AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ENDPOINT; for the \
             local emulator (Azurite on 127.0.0.1:10000) set AZURE_STORAGE_USE_EMULATOR=true"
                .to_string()
        },
        auth: "check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or \
               AZURE_STORAGE_SAS_TOKEN / service-principal variables) and that they may use this \
               container"
            .to_string(),
    };
    if account.is_none() {
        return Err(config_error(
            url,
            hints.store,
            "no Azure storage account configured: set AZURE_STORAGE_ACCOUNT_NAME and \
             AZURE_STORAGE_ACCOUNT_KEY (or another AZURE_* credential), or \
             AZURE_STORAGE_USE_EMULATOR=true for Azurite on 127.0.0.1:10000"
                .to_string(),
        ));
    }
    // Without explicit credentials object_store would ask the managed-identity endpoint
    // (169.254.169.254): only where the operator says this machine is a cloud VM with one.
    let explicit = emulator
        || [
            AzureConfigKey::AccessKey,
            AzureConfigKey::SasKey,
            AzureConfigKey::Token,
            AzureConfigKey::ClientSecret,
            AzureConfigKey::FederatedTokenFile,
        ]
        .iter()
        .any(|k| b.get_config_value(k).is_some())
        || truthy(b.get_config_value(&AzureConfigKey::UseAzureCli))
        || truthy(b.get_config_value(&AzureConfigKey::SkipSignature));
    if !explicit && !truthy(std::env::var("FERRY_USE_INSTANCE_METADATA").ok()) {
        return Err(config_error(
            url,
            hints.store,
            "no Azure credentials: set AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN (on \
             a cloud VM with a managed identity, set FERRY_USE_INSTANCE_METADATA=1 to use it)"
                .to_string(),
        ));
    }
    let az = b
        .build()
        .map_err(|e| config_error(url, hints.store, format!("{} — {}", chain(&e), hints.auth)))?;

    // Create the container if missing: `PUT ?restype=container`, signed like every other request.
    let credential = tokio::time::timeout(CREDENTIAL_TIMEOUT, az.credentials().get_credential())
        .await
        .map_err(|_| {
            config_error(
                url,
                hints.store,
                format!(
                    "no Azure credentials after {}s (tried the managed-identity endpoint): set \
                     AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or \
                     AZURE_STORAGE_USE_EMULATOR=true for Azurite",
                    CREDENTIAL_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            config_error(
                url,
                hints.store,
                format!("no Azure credentials: {} — {}", chain(&e), hints.auth),
            )
        })?;
    let container_url = format!("{endpoint}/{container}?restype=container");
    check_url(url, hints.store, &container_url)?;
    let account_name = account.unwrap_or_default();
    let client = http_client(url, hints.store)?;
    let resp = send_with_retries(url, &hints, &container_url, || {
        let mut req = client
            .put(&container_url)
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .build()
            .expect("valid request");
        AzureAuthorizer::new(&credential, &account_name).authorize(&mut req);
        client.execute(req)
    })
    .await?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let os: Arc<dyn ObjectStore> = Arc::new(az);
    if status.is_success() || (status.as_u16() == 409 && !body.contains("ContainerBeingDeleted")) {
        // Created, or ContainerAlreadyExists.
    } else if status.as_u16() == 409 {
        return Err(config_error(
            url,
            hints.store,
            format!(
                "container {container} is being deleted; wait a minute and retry, or use \
                 another name"
            ),
        ));
    } else {
        creation_refused(url, &hints, &os, "container", container, status, &body).await?;
    }
    Ok(finish(os, prefix, hints))
}

fn with_default_timeouts_az(mut b: MicrosoftAzureBuilder) -> MicrosoftAzureBuilder {
    for (key, value) in [
        (ClientConfigKey::Timeout, REQUEST_TIMEOUT),
        (ClientConfigKey::ConnectTimeout, CONNECT_TIMEOUT),
    ] {
        let k = AzureConfigKey::Client(key);
        if b.get_config_value(&k).is_none() {
            b = b.with_config(k, format!("{}s", value.as_secs()));
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// S3
// ---------------------------------------------------------------------------------------------

async fn open_s3(url: &str, bucket: &str, prefix: Option<&str>) -> Result<Arc<dyn ObjectStore>> {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry_config());
    let region = b
        .get_config_value(&AmazonS3ConfigKey::Region)
        .unwrap_or_else(|| "us-east-1".to_string());
    b = b.with_region(&region);
    let endpoint = b
        .get_config_value(&AmazonS3ConfigKey::Endpoint)
        .map(|e| e.trim_end_matches('/').to_string());
    if let Some(e) = &endpoint {
        // A local server speaks plain HTTP; object_store refuses it unless told.
        if e.starts_with("http://") {
            b = b.with_allow_http(true);
        }
    }
    for (key, value) in [
        (ClientConfigKey::Timeout, REQUEST_TIMEOUT),
        (ClientConfigKey::ConnectTimeout, CONNECT_TIMEOUT),
    ] {
        let k = AmazonS3ConfigKey::Client(key);
        if b.get_config_value(&k).is_none() {
            b = b.with_config(k, format!("{}s", value.as_secs()));
        }
    }
    let virtual_hosted = truthy(b.get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest));
    let bucket_url = match (&endpoint, virtual_hosted) {
        (Some(e), true) => e.clone(),
        (Some(e), false) => format!("{e}/{bucket}"),
        (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
    };
    let hints = Hints {
        store: "S3",
        unreachable: match &endpoint {
            Some(e) => format!(
                "is the S3 server at {e} running? (`scripts/services.sh start` starts one on \
                 127.0.0.1:9000); check AWS_ENDPOINT_URL"
            ),
            None => "check the network and AWS_REGION; for a local S3 server set \
                     AWS_ENDPOINT_URL=http://127.0.0.1:9000"
                .to_string(),
        },
        auth:
            "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and that they \
               may use this bucket"
                .to_string(),
    };
    // Without explicit credentials object_store would ask the instance-metadata service
    // (169.254.169.254): only where the operator says this machine is a cloud VM with a role.
    let explicit = b
        .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
        .is_some()
        || truthy(b.get_config_value(&AmazonS3ConfigKey::SkipSignature))
        || [
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if !explicit && !truthy(std::env::var("FERRY_USE_INSTANCE_METADATA").ok()) {
        return Err(config_error(
            url,
            hints.store,
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (on a cloud VM \
             with an instance role, set FERRY_USE_INSTANCE_METADATA=1 to use it)"
                .to_string(),
        ));
    }
    let s3 = b
        .build()
        .map_err(|e| config_error(url, hints.store, format!("{} — {}", chain(&e), hints.auth)))?;
    let credential = tokio::time::timeout(CREDENTIAL_TIMEOUT, s3.credentials().get_credential())
        .await
        .map_err(|_| {
            config_error(
                url,
                hints.store,
                format!(
                    "no S3 credentials after {}s (tried the instance-metadata service): set \
                     AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                    CREDENTIAL_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            config_error(
                url,
                hints.store,
                format!(
                    "no S3 credentials: {} — set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                    chain(&e)
                ),
            )
        })?;

    // Create the bucket if missing: CreateBucket (`PUT /bucket`), SigV4-signed.
    let body = if region == "us-east-1" {
        String::new()
    } else {
        format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
        )
    };
    check_url(url, hints.store, &bucket_url)?;
    let client = http_client(url, hints.store)?;
    let resp = send_with_retries(url, &hints, &bucket_url, || {
        let mut req = client
            .put(&bucket_url)
            .body(body.clone())
            .build()
            .expect("valid request");
        AwsAuthorizer::new(&credential, "s3", &region).authorize(&mut req, None);
        client.execute(req)
    })
    .await?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let os: Arc<dyn ObjectStore> = Arc::new(s3);
    // 200: created (or, in us-east-1, already ours); 409: BucketAlreadyOwnedByYou /
    // BucketAlreadyExists (if it belongs to someone else, the first request says so).
    if !(status.is_success() || status.as_u16() == 409) {
        creation_refused(url, &hints, &os, "bucket", bucket, status, &text).await?;
    }
    Ok(finish(os, prefix, hints))
}

// ---------------------------------------------------------------------------------------------
// Creation request plumbing
// ---------------------------------------------------------------------------------------------

/// The endpoint (from the environment) must make a valid URL before any request is built.
fn check_url(url: &str, store: &'static str, target: &str) -> Result<()> {
    match url::Url::parse(target) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => Err(config_error(
            url,
            store,
            format!(
                "invalid service URL {target:?}: check the endpoint variables \
                 (AZURE_STORAGE_ENDPOINT, AZURITE_BLOB_STORAGE_URL, AWS_ENDPOINT_URL)"
            ),
        )),
    }
}

fn http_client(url: &str, store: &'static str) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RETRY_TIMEOUT)
        .build()
        .map_err(|e| {
            config_error(
                url,
                store,
                format!("cannot build an HTTP client: {}", chain(&e)),
            )
        })
}

/// Sends the request `make` builds, retrying connection failures and 5xx answers a few times
/// (about 3 s in all) so a server that is still starting is waited for, a dead one is not.
async fn send_with_retries<F, Fut>(
    url: &str,
    hints: &Hints,
    target: &str,
    make: F,
) -> Result<reqwest::Response>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt >= 5;
        match make().await {
            Ok(r) if r.status().is_server_error() && !last => {}
            Ok(r) => return Ok(r),
            Err(e) if !last && (e.is_connect() || e.is_timeout() || e.is_request()) => {}
            Err(e) => {
                let origin = target.split('?').next().unwrap_or(target);
                return Err(config_error(
                    url,
                    hints.store,
                    format!(
                        "unreachable at {origin} after {attempt} attempts: {} — {}",
                        chain(&e),
                        hints.unreachable
                    ),
                ));
            }
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

/// The service refused to create the container/bucket: fine if it exists and we may use it
/// (credentials scoped to one container cannot create it), an error saying why otherwise.
async fn creation_refused(
    url: &str,
    hints: &Hints,
    os: &Arc<dyn ObjectStore>,
    what: &str,
    name: &str,
    status: reqwest::StatusCode,
    body: &str,
) -> Result<()> {
    if matches!(status.as_u16(), 401 | 403)
        && os
            .list_with_delimiter(Some(&Path::from("index")))
            .await
            .is_ok()
    {
        return Ok(());
    }
    let code = xml_code(body).unwrap_or_default();
    let advice = match status.as_u16() {
        401 | 403 => hints.auth.clone(),
        400 => format!("check the {what} name"),
        _ => hints.unreachable.clone(),
    };
    Err(config_error(
        url,
        hints.store,
        format!("cannot create {what} {name}: HTTP {status} {code} — {advice}"),
    ))
}

/// The `<Code>` of an XML error answer.
fn xml_code(body: &str) -> Option<&str> {
    let start = body.find("<Code>")? + 6;
    let end = body[start..].find("</Code>")? + start;
    Some(&body[start..end])
}

fn finish(os: Arc<dyn ObjectStore>, prefix: Option<&str>, hints: Hints) -> Arc<dyn ObjectStore> {
    let os: Arc<dyn ObjectStore> = match prefix {
        Some(p) => Arc::new(object_store::prefix::PrefixStore::new(os, p)),
        None => os,
    };
    Arc::new(Hinted {
        inner: os,
        hints: Arc::new(hints),
    })
}

// ---------------------------------------------------------------------------------------------
// Errors that say what to do
// ---------------------------------------------------------------------------------------------

/// Passes every call through, adding to transport and credential errors what to check.
#[derive(Debug)]
struct Hinted {
    inner: Arc<dyn ObjectStore>,
    hints: Arc<Hints>,
}

impl std::fmt::Debug for Hints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.store)
    }
}

impl std::fmt::Display for Hinted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.inner)
    }
}

/// An error followed by advice.
#[derive(Debug)]
struct WithHint {
    source: Box<dyn std::error::Error + Send + Sync>,
    hint: String,
}

impl std::fmt::Display for WithHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // object_store's messages leave out the cause (e.g. "connection refused"): add it.
        write!(f, "{} — {}", chain(&*self.source), self.hint)
    }
}

impl std::error::Error for WithHint {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

impl Hinted {
    fn hint(&self, e: object_store::Error) -> object_store::Error {
        use object_store::Error as E;
        let wrap = |source, hint: &str| -> Box<dyn std::error::Error + Send + Sync> {
            Box::new(WithHint {
                source,
                hint: hint.to_string(),
            })
        };
        match e {
            E::Generic { store, source } => E::Generic {
                store,
                source: wrap(source, &self.hints.unreachable),
            },
            E::PermissionDenied { path, source } => E::PermissionDenied {
                path,
                source: wrap(source, &self.hints.auth),
            },
            E::Unauthenticated { path, source } => E::Unauthenticated {
                path,
                source: wrap(source, &self.hints.auth),
            },
            other => other,
        }
    }
}

#[async_trait]
impl ObjectStore for Hinted {
    async fn put(&self, location: &Path, payload: PutPayload) -> object_store::Result<PutResult> {
        self.inner
            .put(location, payload)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner
            .put_opts(location, payload, opts)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn put_multipart(
        &self,
        location: &Path,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner
            .put_multipart(location)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOpts,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner
            .put_multipart_opts(location, opts)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn get(&self, location: &Path) -> object_store::Result<GetResult> {
        self.inner.get(location).await.map_err(|e| self.hint(e))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner
            .get_opts(location, options)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn get_range(&self, location: &Path, range: Range<usize>) -> object_store::Result<Bytes> {
        self.inner
            .get_range(location, range)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<usize>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner
            .get_ranges(location, ranges)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn head(&self, location: &Path) -> object_store::Result<ObjectMeta> {
        self.inner.head(location).await.map_err(|e| self.hint(e))
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.inner.delete(location).await.map_err(|e| self.hint(e))
    }

    fn delete_stream<'a>(
        &'a self,
        locations: BoxStream<'a, object_store::Result<Path>>,
    ) -> BoxStream<'a, object_store::Result<Path>> {
        self.inner
            .delete_stream(locations)
            .map(move |r| r.map_err(|e| self.hint(e)))
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'_, object_store::Result<ObjectMeta>> {
        self.inner
            .list(prefix)
            .map(move |r| r.map_err(|e| self.hint(e)))
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'_, object_store::Result<ObjectMeta>> {
        self.inner
            .list_with_offset(prefix, offset)
            .map(move |r| r.map_err(|e| self.hint(e)))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner
            .list_with_delimiter(prefix)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await.map_err(|e| self.hint(e))
    }

    async fn rename(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.rename(from, to).await.map_err(|e| self.hint(e))
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner
            .copy_if_not_exists(from, to)
            .await
            .map_err(|e| self.hint(e))
    }

    async fn rename_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner
            .rename_if_not_exists(from, to)
            .await
            .map_err(|e| self.hint(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_is_checked_without_reaching_the_store() {
        assert!(check_store_url("file:///srv/ferry").is_ok());
        assert!(check_store_url("az://ferry-replicas/dr").is_ok());
        assert!(check_store_url("s3://ferry-replicas").is_ok());
        assert!(check_store_url("file://relative").is_err());
        assert!(check_store_url("az://Bad_Name").is_err());
        assert!(check_store_url("gs://bucket").is_err());
    }

    #[test]
    fn names_are_checked_before_any_request() {
        assert!(check_container_name("ferry-replicas").is_ok());
        assert!(check_container_name("ab").is_err());
        assert!(check_container_name("Upper").is_err());
        assert!(check_container_name("a--b").is_err());
        assert!(check_container_name("-ab").is_err());
        assert!(check_bucket_name("ferry.replicas-1").is_ok());
        assert!(check_bucket_name("a..b").is_err());
        assert!(check_bucket_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn url_forms() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for bad in [
            "az://Bad_Name",
            "s3://x",
            "ftp://host/dir",
            "file://relative",
        ] {
            let e = rt.block_on(open(bad)).map(|_| ()).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("invalid") || msg.contains("unsupported"),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn xml_error_codes() {
        assert_eq!(
            xml_code("<Error><Code>BucketAlreadyOwnedByYou</Code></Error>"),
            Some("BucketAlreadyOwnedByYou")
        );
        assert_eq!(xml_code("nope"), None);
    }
}
