//! The Cognito side: one `ForgotPassword` call per job attempt.
//!
//! The SDK client is built with its retries **off**
//! (`RetryConfig::disabled()`). By default the SDK would itself retry
//! TooManyRequests and LimitExceeded; stacked under our policy that would
//! multiply calls against a shared, unraisable quota, and retry a per-user
//! limit at once. [`crate::worker::policy`] is therefore the only retry policy.
//!
//! Several user pools ([`Pools`]): one [`Cognito`] per configured pool, each
//! with its own app client, secret and action, on one SDK client per
//! distinct (Region, endpoint) ([`clients_by_pool`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_cognitoidentityprovider::Client;
use aws_sdk_cognitoidentityprovider::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_cognitoidentityprovider::types::{AnalyticsMetadataType, UserContextDataType};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{Action, CognitoSettings, DEFAULT_POOL, Pool};
use crate::crypto::hmac_sha256;
use crate::job::ResetJob;
use crate::telemetry::{self, CallResult};

/// Builds the Cognito client from the shared AWS config (region, credentials,
/// `AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER`), with SDK retries disabled
/// and a per-call timeout.
pub fn build_client(sdk: &SdkConfig, settings: &CognitoSettings) -> Client {
    let conf = aws_sdk_cognitoidentityprovider::config::Builder::from(sdk)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(settings.request_timeout_seconds))
                .connect_timeout(Duration::from_secs(3))
                .build(),
        )
        .build();
    Client::from_conf(conf)
}

/// An SDK client for every pool: pools with neither `region` nor
/// `endpoint_url` share `base` (the SDK's Region and endpoint); the others
/// get one client per distinct (Region, endpoint), derived from `base`, so
/// they keep its credentials, retries (off) and timeouts.
pub fn clients_by_pool(base: &Client, pools: &[Pool]) -> BTreeMap<String, Client> {
    let mut by_place: HashMap<(Option<String>, Option<String>), Client> = HashMap::new();
    pools
        .iter()
        .map(|pool| {
            let place = (pool.region.clone(), pool.endpoint_url.clone());
            let client = by_place
                .entry(place)
                .or_insert_with(|| {
                    if pool.region.is_none() && pool.endpoint_url.is_none() {
                        return base.clone();
                    }
                    let mut conf = base.config().to_builder();
                    if let Some(region) = &pool.region {
                        conf = conf.region(aws_sdk_cognitoidentityprovider::config::Region::new(
                            region.clone(),
                        ));
                    }
                    if let Some(url) = &pool.endpoint_url {
                        conf = conf.endpoint_url(url);
                    }
                    Client::from_conf(conf.build())
                })
                .clone();
            (pool.name.clone(), client)
        })
        .collect()
}

/// Base64(HMAC-SHA256(key = client secret, message = username + client id)).
pub fn secret_hash(secret: &str, username: &str, client_id: &str) -> String {
    let mac = hmac_sha256(
        secret.as_bytes(),
        &[username.as_bytes(), client_id.as_bytes()],
    );
    base64::engine::general_purpose::STANDARD.encode(mac)
}

/// Every error the outcome policy knows by name, plus transport classes.
/// Also the `code` label of `reset_worker_cognito_requests_total`, so the
/// label set stays small and fixed whatever a server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    TooManyRequests,
    InternalError,
    LimitExceeded,
    UserNotFound,
    InvalidParameter,
    UserLambdaValidation,
    CodeDeliveryFailure,
    InvalidLambdaResponse,
    UnexpectedLambda,
    NotAuthorized,
    ResourceNotFound,
    InvalidEmailRoleAccessPolicy,
    InvalidSmsRoleAccessPolicy,
    InvalidSmsRoleTrustRelationship,
    Forbidden,
    /// A missing IAM permission (`AccessDeniedException`), e.g. no
    /// `cognito-idp:AdminResetUserPassword` on the worker's role.
    AccessDenied,
    /// The credentials are missing, expired, unknown or wrongly signed
    /// (`ExpiredTokenException`, `UnrecognizedClientException`,
    /// `InvalidSignatureException`, and their SQS names).
    Credentials,
    /// The call exceeded `cognito.request_timeout_seconds`: it was sent,
    /// and Cognito may have acted on it.
    Timeout,
    /// The connection broke after the request may have been written
    /// (reset, closed mid-answer): as uncertain as a timeout.
    ConnectionLost,
    /// The request never left: connection refused, DNS, TLS, connect timeout.
    Connection,
    /// A 5xx answer without a known error code.
    ServerError,
    /// Anything else, including codes this build does not know.
    Other,
}

impl ErrorCode {
    pub fn from_aws_code(code: &str) -> Self {
        // Some protocols send "Namespace#Code" or "Code:detail".
        let code = code.rsplit('#').next().unwrap_or(code);
        let code = code.split(':').next().unwrap_or(code);
        match code {
            "TooManyRequestsException" => Self::TooManyRequests,
            "InternalErrorException" => Self::InternalError,
            "LimitExceededException" => Self::LimitExceeded,
            "UserNotFoundException" => Self::UserNotFound,
            "InvalidParameterException" => Self::InvalidParameter,
            "UserLambdaValidationException" => Self::UserLambdaValidation,
            "CodeDeliveryFailureException" => Self::CodeDeliveryFailure,
            "InvalidLambdaResponseException" => Self::InvalidLambdaResponse,
            "UnexpectedLambdaException" => Self::UnexpectedLambda,
            "NotAuthorizedException" => Self::NotAuthorized,
            "ResourceNotFoundException" => Self::ResourceNotFound,
            "InvalidEmailRoleAccessPolicyException" => Self::InvalidEmailRoleAccessPolicy,
            "InvalidSmsRoleAccessPolicyException" => Self::InvalidSmsRoleAccessPolicy,
            "InvalidSmsRoleTrustRelationshipException" => Self::InvalidSmsRoleTrustRelationship,
            "ForbiddenException" => Self::Forbidden,
            "AccessDeniedException" | "AccessDenied" => Self::AccessDenied,
            "ExpiredTokenException"
            | "ExpiredToken"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "MissingAuthenticationToken"
            | "MissingAuthenticationTokenException"
            | "IncompleteSignature"
            | "IncompleteSignatureException"
            | "InvalidAccessKeyId"
            | "InvalidSecurity" => Self::Credentials,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooManyRequests => "TooManyRequestsException",
            Self::InternalError => "InternalErrorException",
            Self::LimitExceeded => "LimitExceededException",
            Self::UserNotFound => "UserNotFoundException",
            Self::InvalidParameter => "InvalidParameterException",
            Self::UserLambdaValidation => "UserLambdaValidationException",
            Self::CodeDeliveryFailure => "CodeDeliveryFailureException",
            Self::InvalidLambdaResponse => "InvalidLambdaResponseException",
            Self::UnexpectedLambda => "UnexpectedLambdaException",
            Self::NotAuthorized => "NotAuthorizedException",
            Self::ResourceNotFound => "ResourceNotFoundException",
            Self::InvalidEmailRoleAccessPolicy => "InvalidEmailRoleAccessPolicyException",
            Self::InvalidSmsRoleAccessPolicy => "InvalidSmsRoleAccessPolicyException",
            Self::InvalidSmsRoleTrustRelationship => "InvalidSmsRoleTrustRelationshipException",
            Self::Forbidden => "ForbiddenException",
            Self::AccessDenied => "AccessDeniedException",
            Self::Credentials => "credentials",
            Self::Timeout => "timeout",
            Self::ConnectionLost => "connection_lost",
            Self::Connection => "connection",
            Self::ServerError => "server_error",
            Self::Other => "other",
        }
    }
}

/// A failed call. The message text from the server is kept for the operator
/// (it names e.g. the missing role) but it can echo request values, so it is
/// only logged for fatal errors, which concern the setup, not a user.
#[derive(Debug, thiserror::Error)]
#[error("{}{}", code.as_str(), http_status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
pub struct CallError {
    pub code: ErrorCode,
    pub http_status: Option<u16>,
    pub server_message: Option<String>,
}

impl CallError {
    /// NotAuthorizedException usually means the campaign is misconfigured
    /// (wrong secret, flow not allowed), but Cognito also uses it for the
    /// state of one user: a disabled user, or (AdminResetUserPassword) a user
    /// who never set a password. Those must not halt a campaign.
    pub fn is_user_state(&self) -> bool {
        const USER_STATE: [&str; 2] = ["user is disabled", "cannot be reset in the current state"];
        self.code == ErrorCode::NotAuthorized
            && self.server_message.as_deref().is_some_and(|m| {
                let m = m.to_ascii_lowercase();
                USER_STATE.iter().any(|p| m.contains(p))
            })
    }

    fn from_sdk<E, R>(err: &SdkError<E, R>, status: Option<u16>) -> Self
    where
        E: ProvideErrorMetadata,
    {
        let code = match err {
            // The operation timeout: the request was (or may have been) sent.
            SdkError::TimeoutError(_) => ErrorCode::Timeout,
            // The connect timeout (no read timeout is set): nothing was sent.
            SdkError::DispatchFailure(d) if d.is_timeout() => ErrorCode::Connection,
            SdkError::DispatchFailure(d)
                if d.as_connector_error()
                    .is_some_and(|e| failed_before_sending(e)) =>
            {
                ErrorCode::Connection
            }
            SdkError::DispatchFailure(_) => ErrorCode::ConnectionLost,
            _ => match err.code() {
                Some(c) => match ErrorCode::from_aws_code(c) {
                    ErrorCode::Other if status.is_some_and(|s| s >= 500) => ErrorCode::ServerError,
                    known => known,
                },
                None if status.is_some_and(|s| s >= 500) => ErrorCode::ServerError,
                None => ErrorCode::Other,
            },
        };
        Self {
            code,
            http_status: status,
            server_message: err.message().map(str::to_owned),
        }
    }
}

/// True when the error's cause says the connection was never made (refused,
/// no route, name resolution), so the request cannot have reached Cognito.
/// Anything else that breaks a dispatch may have happened after the request
/// was written.
fn failed_before_sending(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionRefused
                    | AddrNotAvailable
                    | HostUnreachable
                    | NetworkUnreachable
                    | NotFound
            );
        }
        source = e.source();
    }
    false
}

/// How the code was delivered (`EMAIL`, `SMS`); never the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub medium: &'static str,
}

/// What `AdminGetUser` says of a user, for `report --refresh-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserState {
    /// Cognito's `UserStatus` (`CONFIRMED`, `RESET_REQUIRED`, ...).
    pub status: String,
    /// Cognito's `UserLastModifiedDate`, ms since the epoch.
    pub modified_at_ms: Option<u64>,
}

/// One user as `ListUsers` shows it, reduced to what `enqueue
/// --from-user-pool` needs to tell whether a code can reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedUser {
    pub username: String,
    /// Cognito's `Enabled`; a disabled user cannot reset.
    pub enabled: bool,
    /// `email_verified = "true"` and an `email`.
    pub verified_email: bool,
    /// `phone_number_verified = "true"` and a `phone_number`.
    pub verified_phone: bool,
}

/// One page of `ListUsers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersPage {
    pub users: Vec<ListedUser>,
    /// The token of the next page; `None` on the last.
    pub next: Option<String>,
}

/// `ListUsers` page size: Cognito's maximum.
pub const LIST_USERS_LIMIT: i32 = 60;

/// The app client secret, replaceable while running (a rotated Kubernetes
/// Secret file is re-read by the config watcher). A std `RwLock`: read once
/// per call, never held across an await.
pub type SharedSecret = Arc<RwLock<Option<SecretString>>>;

/// The Region of a client built without one (the SDK then refuses every
/// call, so its limiter never grants one that matters).
pub const UNKNOWN_REGION: &str = "unknown";

/// Every configured pool's [`Cognito`], by name.
pub struct Pools {
    by_name: BTreeMap<String, Cognito>,
}

impl Pools {
    /// One [`Cognito`] per pool of `settings`, on the clients of
    /// [`clients_by_pool`].
    pub fn new(base: &Client, settings: &CognitoSettings) -> Self {
        let pools = settings.all_pools();
        let mut clients = clients_by_pool(base, &pools);
        let by_name = pools
            .iter()
            .map(|pool| {
                let client = clients.remove(&pool.name).unwrap_or_else(|| base.clone());
                let cognito = Cognito::new(client, pool, &settings.client_metadata);
                (pool.name.clone(), cognito)
            })
            .collect();
        Self { by_name }
    }

    /// The pool a job names (`None`: `default`); `None` when no pool has
    /// that name.
    pub fn get(&self, name: Option<&str>) -> Option<&Cognito> {
        self.by_name.get(name.unwrap_or(DEFAULT_POOL))
    }

    /// The Regions the pools call, each once.
    pub fn regions(&self) -> std::collections::BTreeSet<String> {
        self.by_name.values().map(|c| c.region.clone()).collect()
    }

    /// Cognito calls a job makes at most on success: 2 when a pool signs
    /// its users out after the reset, else 1. Paces the receive loop, which
    /// waits for slots freed at the rate cap divided by this.
    pub fn calls_per_job(&self) -> f64 {
        if self.by_name.values().any(Cognito::signs_out) {
            2.0
        } else {
            1.0
        }
    }

    /// Every pool's replaceable secret, by pool name, for the config
    /// watcher.
    pub fn secrets(&self) -> BTreeMap<String, SharedSecret> {
        self.by_name
            .iter()
            .map(|(name, c)| (name.clone(), c.secret()))
            .collect()
    }
}

/// Calls ForgotPassword with every parameter the job and config provide.
pub struct Cognito {
    client: Client,
    /// The Region the client calls: whose quota (and limiter) the pool's
    /// calls draw on.
    region: String,
    action: Action,
    /// Call `AdminUserGlobalSignOut` after each reset (`sign_out`).
    sign_out: bool,
    user_pool_id: Option<String>,
    client_id: String,
    client_secret: SharedSecret,
    default_metadata: BTreeMap<String, String>,
}

impl Cognito {
    /// The calls of one pool; `default_metadata` is `cognito.client_metadata`.
    pub fn new(client: Client, pool: &Pool, default_metadata: &BTreeMap<String, String>) -> Self {
        let region = client
            .config()
            .region()
            .map_or_else(|| UNKNOWN_REGION.to_owned(), |r| r.as_ref().to_owned());
        Self {
            client,
            region,
            action: pool.action,
            sign_out: pool.sign_out,
            user_pool_id: pool.user_pool_id.clone(),
            client_id: pool.client_id.clone(),
            client_secret: Arc::new(RwLock::new(pool.client_secret.clone())),
            default_metadata: default_metadata.clone(),
        }
    }

    /// The Region this pool's calls go to.
    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn secret(&self) -> SharedSecret {
        self.client_secret.clone()
    }

    /// `ClientMetadata` for a job: campaign defaults overridden by the job's
    /// own values; `None` when empty, so the field is left out.
    fn client_metadata(&self, job: &ResetJob) -> Option<HashMap<String, String>> {
        let merged = job.merged_metadata(&self.default_metadata);
        (!merged.is_empty()).then(|| merged.into_iter().collect())
    }

    /// The pool's ID (`cognito.user_pool_id` or
    /// `cognito.pools.NAME.user_pool_id`), if configured.
    pub fn user_pool_id(&self) -> Option<&str> {
        self.user_pool_id.as_deref()
    }

    /// The pool's action (`cognito.action` or the pool's own).
    pub fn action(&self) -> Action {
        self.action
    }

    /// Whether the pool's users are signed out after their reset.
    pub fn signs_out(&self) -> bool {
        self.sign_out
    }

    /// `AdminUserGlobalSignOut`: revokes every refresh token of the user
    /// (their sessions end when the access tokens expire), so an attacker
    /// holding a session is locked out. Idempotent and sends nothing to the
    /// user, so unlike the reset it is safe to repeat. No retry here: the
    /// caller paces and retries.
    pub async fn sign_out(&self, username: &str) -> Result<(), CallError> {
        let request = self
            .client
            .admin_user_global_sign_out()
            .set_user_pool_id(self.user_pool_id.clone())
            .username(username);
        timed(&self.region, "AdminUserGlobalSignOut", request.send()).await?;
        Ok(())
    }

    /// One page of `ListUsers` on the pool: `filter` is Cognito's own filter
    /// syntax, passed as given; `token` the previous page's. Only the
    /// attributes that tell whether a code can reach the user are asked for,
    /// so no more personal data than needed crosses the wire. No retry here:
    /// the caller paces and retries.
    pub async fn list_users(
        &self,
        filter: Option<&str>,
        token: Option<&str>,
    ) -> Result<UsersPage, CallError> {
        const WANTED: [&str; 4] = [
            "email",
            "email_verified",
            "phone_number",
            "phone_number_verified",
        ];
        let request = self
            .client
            .list_users()
            .set_user_pool_id(self.user_pool_id.clone())
            .limit(LIST_USERS_LIMIT)
            .set_filter(filter.map(str::to_owned))
            .set_pagination_token(token.map(str::to_owned))
            .set_attributes_to_get(Some(WANTED.iter().map(|a| (*a).to_owned()).collect()));
        let out = timed(&self.region, "ListUsers", request.send()).await?;
        let users = out
            .users()
            .iter()
            .filter_map(|user| {
                let attribute = |name: &str| {
                    user.attributes()
                        .iter()
                        .find(|a| a.name() == name)
                        .and_then(|a| a.value())
                };
                let has = |name: &str| attribute(name).is_some_and(|v| !v.is_empty());
                let verified = |name: &str| attribute(name) == Some("true");
                Some(ListedUser {
                    username: user.username()?.to_owned(),
                    // Cognito sends `Enabled` for every listed user.
                    enabled: user.enabled(),
                    verified_email: has("email") && verified("email_verified"),
                    verified_phone: has("phone_number") && verified("phone_number_verified"),
                })
            })
            .collect();
        Ok(UsersPage {
            users,
            next: out
                .pagination_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        })
    }

    /// The user's `UserStatus` and `UserLastModifiedDate` (ms since the
    /// epoch), by one `AdminGetUser` (`report --refresh-status`); `None`
    /// when the pool has no such user. No retry here: the caller paces and
    /// retries.
    pub async fn user_status(&self, username: &str) -> Result<Option<UserState>, CallError> {
        let request = self
            .client
            .admin_get_user()
            .set_user_pool_id(self.user_pool_id.clone())
            .username(username);
        match timed(&self.region, "AdminGetUser", request.send()).await {
            Ok(out) => Ok(Some(UserState {
                status: out
                    .user_status()
                    .map_or_else(|| "UNKNOWN".to_owned(), |s| s.as_str().to_owned()),
                modified_at_ms: out
                    .user_last_modified_date()
                    .and_then(|d| d.to_millis().ok())
                    .and_then(|ms| u64::try_from(ms).ok()),
            })),
            Err(err) if err.code == ErrorCode::UserNotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Runs the configured action for one job.
    pub async fn reset(&self, job: &ResetJob) -> Result<Delivery, CallError> {
        match self.action {
            Action::ForgotPassword => self.forgot_password(job).await,
            Action::AdminResetUserPassword => self.admin_reset_user_password(job).await,
        }
    }

    /// With `admin_reset_user_password`: is the user already in
    /// `RESET_REQUIRED` (so an earlier call, whose answer was lost, did
    /// reset them)? `None` for `forgot_password`, which leaves no trace in
    /// the user's status. One `AdminGetUser` (needs
    /// `cognito-idp:AdminGetUser`); it draws on a different quota than the
    /// reset.
    pub async fn reset_already_done(&self, job: &ResetJob) -> Option<bool> {
        if self.action != Action::AdminResetUserPassword {
            return None;
        }
        let out = self
            .client
            .admin_get_user()
            .set_user_pool_id(self.user_pool_id.clone())
            .username(job.username.expose())
            .send()
            .await
            .ok()?;
        Some(out.user_status().map(|s| s.as_str()) == Some("RESET_REQUIRED"))
    }

    /// `AdminResetUserPassword`: invalidates the password, then Cognito
    /// sends a code. It takes no SecretHash, context or analytics data, and
    /// reports no delivery medium.
    async fn admin_reset_user_password(&self, job: &ResetJob) -> Result<Delivery, CallError> {
        let request = self
            .client
            .admin_reset_user_password()
            .set_user_pool_id(self.user_pool_id.clone())
            .username(job.username.expose())
            .set_client_metadata(self.client_metadata(job));
        timed(&self.region, "AdminResetUserPassword", request.send()).await?;
        Ok(Delivery { medium: "none" })
    }

    async fn forgot_password(&self, job: &ResetJob) -> Result<Delivery, CallError> {
        let username = job.username.expose();
        let secret_hash = self
            .client_secret
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| secret_hash(s.expose_secret(), username, &self.client_id));
        let mut request = self
            .client
            .forgot_password()
            .client_id(&self.client_id)
            .username(username)
            .set_secret_hash(secret_hash)
            .set_client_metadata(self.client_metadata(job));
        if let Some(ctx) = &job.user_context {
            request = request.user_context_data(
                UserContextDataType::builder()
                    .set_ip_address(ctx.ip_address.clone())
                    .set_encoded_data(ctx.encoded_data.clone())
                    .build(),
            );
        }
        if let Some(id) = &job.analytics_endpoint_id {
            request = request.analytics_metadata(
                AnalyticsMetadataType::builder()
                    .analytics_endpoint_id(id)
                    .build(),
            );
        }

        let out = timed(&self.region, "ForgotPassword", request.send()).await?;
        let medium = out
            .code_delivery_details()
            .and_then(|d| d.delivery_medium())
            .map(|m| match m.as_str() {
                "EMAIL" => "EMAIL",
                "SMS" => "SMS",
                _ => "other",
            })
            .unwrap_or("none");
        Ok(Delivery { medium })
    }
}

/// Sends one call to `region`, records its metrics under `operation` (the
/// API's name), and turns an SDK error into a [`CallError`].
async fn timed<T, E>(
    region: &str,
    operation: &'static str,
    send: impl Future<
        Output = Result<
            T,
            SdkError<E, aws_sdk_cognitoidentityprovider::config::http::HttpResponse>,
        >,
    >,
) -> Result<T, CallError>
where
    E: ProvideErrorMetadata,
{
    let started = Instant::now();
    let result = send.await;
    let elapsed = started.elapsed();
    match result {
        Ok(out) => {
            telemetry::cognito_request(region, operation, CallResult::Ok, elapsed);
            Ok(out)
        }
        Err(err) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            let call_error = CallError::from_sdk(&err, status);
            let result = match call_error.code {
                ErrorCode::TooManyRequests => CallResult::Throttled,
                code => CallResult::Error(code.as_str()),
            };
            telemetry::cognito_request(region, operation, result, elapsed);
            Err(call_error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_hash_matches_known_vector() {
        // Computed independently with Python:
        // base64.b64encode(hmac.new(b"client-secret-123",
        //     b"alice@example.com" + b"1example23456789", hashlib.sha256).digest())
        assert_eq!(
            secret_hash("client-secret-123", "alice@example.com", "1example23456789"),
            "nAJ7KclaH3jOut0oytSx+0cN0BwVWPh2+xAk3bk1yvI="
        );
    }

    #[test]
    fn each_pool_gets_a_client_for_its_region() {
        use aws_sdk_cognitoidentityprovider::config::{BehaviorVersion, Region};
        let base = Client::from_conf(
            aws_sdk_cognitoidentityprovider::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new("us-east-1"))
                .build(),
        );
        let settings: CognitoSettings = serde_json::from_value(serde_json::json!({
            "client_id": "top",
            "pools": {
                "eu": {"client_id": "c-eu", "region": "eu-west-1"},
                "emulated": {"client_id": "c-em", "endpoint_url": "http://127.0.0.1:9"},
                "plain": {"client_id": "c-plain"},
            },
        }))
        .unwrap();
        let clients = clients_by_pool(&base, &settings.all_pools());
        let region = |name: &str| {
            clients[name]
                .config()
                .region()
                .map(|r| r.as_ref().to_owned())
        };
        assert_eq!(clients.len(), 4);
        assert_eq!(region("default").as_deref(), Some("us-east-1"));
        assert_eq!(region("eu").as_deref(), Some("eu-west-1"));
        // An endpoint of its own keeps the SDK's Region; so does a pool
        // that sets neither.
        assert_eq!(region("emulated").as_deref(), Some("us-east-1"));
        assert_eq!(region("plain").as_deref(), Some("us-east-1"));
        // Each pool's Cognito keeps its own client ID.
        let pools = Pools::new(&base, &settings);
        assert_eq!(pools.get(None).map(|c| c.client_id.as_str()), Some("top"));
        assert_eq!(
            pools.get(Some("eu")).map(|c| c.client_id.as_str()),
            Some("c-eu")
        );
        assert!(pools.get(Some("nope")).is_none());
        assert_eq!(pools.secrets().len(), 4);
    }

    #[test]
    fn error_codes_round_trip_and_unknown_is_other() {
        for code in [
            "TooManyRequestsException",
            "LimitExceededException",
            "NotAuthorizedException",
            "InvalidSmsRoleTrustRelationshipException",
        ] {
            assert_eq!(ErrorCode::from_aws_code(code).as_str(), code);
        }
        assert_eq!(
            ErrorCode::from_aws_code("com.amazonaws#UserNotFoundException"),
            ErrorCode::UserNotFound
        );
        assert_eq!(
            ErrorCode::from_aws_code("BrandNewException"),
            ErrorCode::Other
        );
        // IAM and credential errors have names of their own (hardening #10),
        // in Cognito's and SQS's spelling alike.
        for code in ["AccessDeniedException", "AccessDenied"] {
            assert_eq!(ErrorCode::from_aws_code(code), ErrorCode::AccessDenied);
        }
        for code in [
            "ExpiredTokenException",
            "UnrecognizedClientException",
            "InvalidSignatureException",
            "InvalidClientTokenId",
            "SignatureDoesNotMatch",
        ] {
            assert_eq!(ErrorCode::from_aws_code(code), ErrorCode::Credentials);
        }
    }
}
