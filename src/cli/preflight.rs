//! `reset-worker preflight`: checks the queues, the app client and the
//! pool before a campaign, each as PASS, WARN or FAIL. Every configured
//! pool is checked, each on its own client (Region, endpoint).

use std::collections::HashMap;
use std::fmt;

use aws_sdk_cognitoidentityprovider::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_cognitoidentityprovider::types::{
    EmailSendingAccountType, PreventUserExistenceErrorTypes,
};
use serde::Serialize;

use super::estimate;
use crate::aws::cognito::ErrorCode;
use crate::aws::sqs::Queue;
use crate::config::{DEFAULT_POOL, LedgerBackend, Pool, Settings};
use crate::ledger::{Ledger, dynamodb};

/// The account-level cap of `ForgotPassword` (UserAccountRecovery), per
/// account and Region.
pub const ACCOUNT_RECOVERY_QUOTA_RPS: u32 = 30;
/// Cognito's own email service sends at most this many emails a day.
pub const COGNITO_DEFAULT_EMAILS_PER_DAY: u64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
    }
}

/// A numeric queue attribute; 0 when absent.
pub(super) fn count(attrs: &HashMap<String, String>, key: &str) -> u64 {
    attrs.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Runs every check. The caller exits non-zero when any is `Fail`.
pub async fn checks(
    settings: &Settings,
    queue: &Queue,
    cognito: &aws_sdk_cognitoidentityprovider::Client,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut backlog = 0;

    match queue.attributes(queue.url()).await {
        Err(err) => checks.push(check("queue", Level::Fail, err.to_string())),
        Ok(attrs) => {
            backlog = count(&attrs, "ApproximateNumberOfMessages")
                + count(&attrs, "ApproximateNumberOfMessagesDelayed")
                + count(&attrs, "ApproximateNumberOfMessagesNotVisible");
            checks.push(check(
                "queue",
                Level::Pass,
                format!("reachable; {backlog} messages"),
            ));
            match attrs.get("RedrivePolicy") {
                None => checks.push(check(
                    "redrive policy",
                    Level::Fail,
                    "the queue has no redrive policy: a message that keeps failing is received forever",
                )),
                Some(policy) => {
                    let max_receive = serde_json::from_str::<serde_json::Value>(policy)
                        .ok()
                        .and_then(|v| {
                            let m = &v["maxReceiveCount"];
                            m.as_u64().or_else(|| m.as_str().and_then(|s| s.parse().ok()))
                        })
                        .unwrap_or(0);
                    // Deferrals (throttling, per-user limits) use receives too.
                    if max_receive < 3 {
                        checks.push(check(
                            "redrive policy",
                            Level::Warn,
                            format!("maxReceiveCount is {max_receive}: deferred jobs (throttling, per-user limits) may reach the dead-letter queue early; use 5 or more"),
                        ));
                    } else {
                        checks.push(check(
                            "redrive policy",
                            Level::Pass,
                            format!("maxReceiveCount {max_receive}"),
                        ));
                    }
                }
            }
        }
    }

    // The heartbeat extends visibility at half the timeout, and a call can
    // take up to the request timeout: the first extension must come before
    // a message could reappear.
    let vt = settings.sqs.visibility_timeout_seconds;
    let call = settings.cognito.request_timeout_seconds;
    if vt < 2 * call {
        checks.push(check(
            "visibility timeout",
            Level::Warn,
            format!("sqs.visibility_timeout_seconds ({vt}) is under twice cognito.request_timeout_seconds ({call})"),
        ));
    } else {
        checks.push(check(
            "visibility timeout",
            Level::Pass,
            format!("{vt} s, heartbeat every {} s", vt / 2),
        ));
    }

    match queue.dead_letter_url() {
        None => checks.push(check(
            "dead-letter queue",
            Level::Warn,
            "sqs.dead_letter_queue_url is not set: rejected messages wait for the redrive policy",
        )),
        Some(dlq) => match queue.attributes(dlq).await {
            Ok(attrs) => checks.push(check(
                "dead-letter queue",
                Level::Pass,
                format!(
                    "reachable; {} messages",
                    count(&attrs, "ApproximateNumberOfMessages")
                ),
            )),
            Err(err) => checks.push(check("dead-letter queue", Level::Fail, err.to_string())),
        },
    }

    let pools = settings.cognito.all_pools();
    let clients = crate::aws::cognito::clients_by_pool(cognito, &pools);
    for pool in &pools {
        let client = clients.get(&pool.name).unwrap_or(cognito);
        // With one pool the lines read as they always did; with several,
        // each pool's lines name it.
        let prefix = if pools.len() > 1 {
            format!("pool `{}`: ", pool.name)
        } else {
            String::new()
        };
        let start = checks.len();
        pool_checks(pool, client, backlog, &mut checks).await;
        for c in &mut checks[start..] {
            c.detail.insert_str(0, &prefix);
        }
    }

    let rps = settings.limits.max_rps;
    let level = if rps > ACCOUNT_RECOVERY_QUOTA_RPS {
        Level::Warn
    } else {
        Level::Pass
    };
    checks.push(check(
        "duration",
        level,
        format!(
            "{backlog} jobs at limits.max_rps {rps}: about {}{}",
            estimate(backlog, rps),
            if rps > ACCOUNT_RECOVERY_QUOTA_RPS {
                " (above the account's 30/s recovery quota: expect throttling)"
            } else {
                ""
            }
        ),
    ));
    checks
}

/// A pool's key as the configuration spells it.
fn pool_key(pool: &Pool, key: &str) -> String {
    if pool.name == DEFAULT_POOL {
        format!("cognito.{key}")
    } else {
        format!("cognito.pools.{}.{key}", pool.name)
    }
}

/// The checks of one pool: its app client and the pool itself.
async fn pool_checks(
    pool: &Pool,
    cognito: &aws_sdk_cognitoidentityprovider::Client,
    backlog: u64,
    checks: &mut Vec<Check>,
) {
    match pool.user_pool_id.as_deref() {
        None => checks.push(check(
            "app client",
            Level::Warn,
            format!(
                "{} is not set: the app client and the pool cannot be checked",
                pool_key(pool, "user_pool_id")
            ),
        )),
        Some(pool_id) => {
            match cognito
                .describe_user_pool_client()
                .user_pool_id(pool_id)
                .client_id(&pool.client_id)
                .send()
                .await
            {
                Err(err) => checks.push(check(
                    "app client",
                    Level::Fail,
                    format!("DescribeUserPoolClient: {}", DisplayErrorContext(&err)),
                )),
                Ok(out) => {
                    let client = out.user_pool_client();
                    let has_secret = client.and_then(|c| c.client_secret()).is_some();
                    let configured = pool.client_secret.is_some();
                    let level = if has_secret == configured {
                        Level::Pass
                    } else {
                        Level::Fail
                    };
                    let detail = match (has_secret, configured) {
                        (true, true) => "exists, has a secret, and one is configured",
                        (false, false) => "exists, without a secret, and none is configured",
                        (true, false) => {
                            "the client has a secret but none is configured: every call would fail with NotAuthorizedException"
                        }
                        (false, true) => {
                            "a client secret is configured but the client has none: every call would fail"
                        }
                    };
                    checks.push(check("app client", level, detail));
                    let prevent = client.and_then(|c| c.prevent_user_existence_errors());
                    if prevent == Some(&PreventUserExistenceErrorTypes::Enabled) {
                        checks.push(check(
                            "user existence errors",
                            Level::Warn,
                            "PreventUserExistenceErrors is ENABLED: unknown users look like successes, so `skipped` (user not found) can never be observed",
                        ));
                    } else {
                        checks.push(check(
                            "user existence errors",
                            Level::Pass,
                            "unknown users are reported (outcome skipped)",
                        ));
                    }
                }
            }
            if pool.sign_out {
                checks.push(sign_out_check(cognito, pool_id).await);
            }
            match cognito
                .describe_user_pool()
                .user_pool_id(pool_id)
                .send()
                .await
            {
                Err(err) => checks.push(check(
                    "user pool",
                    Level::Fail,
                    format!("DescribeUserPool: {}", DisplayErrorContext(&err)),
                )),
                Ok(out) => {
                    let pool = out.user_pool();
                    let mechanisms = pool
                        .and_then(|p| p.account_recovery_setting())
                        .map(|s| s.recovery_mechanisms().len())
                        .unwrap_or(0);
                    checks.push(if mechanisms > 0 {
                        check("account recovery", Level::Pass, format!("{mechanisms} recovery mechanisms"))
                    } else {
                        check(
                            "account recovery",
                            Level::Warn,
                            "the pool has no AccountRecoverySetting: Cognito falls back to its legacy choice of SMS or email",
                        )
                    });
                    let account = pool
                        .and_then(|p| p.email_configuration())
                        .and_then(|e| e.email_sending_account().cloned())
                        .unwrap_or(EmailSendingAccountType::CognitoDefault);
                    if account == EmailSendingAccountType::CognitoDefault
                        && backlog > COGNITO_DEFAULT_EMAILS_PER_DAY
                    {
                        checks.push(check(
                            "email sending",
                            Level::Warn,
                            format!("COGNITO_DEFAULT sends at most {COGNITO_DEFAULT_EMAILS_PER_DAY} emails a day; this campaign has {backlog} jobs. Configure Amazon SES (DEVELOPER)"),
                        ));
                    } else {
                        checks.push(check(
                            "email sending",
                            Level::Pass,
                            account.as_str().to_owned(),
                        ));
                    }
                }
            }
        }
    }
}

/// With `sign_out`: is `AdminUserGlobalSignOut` allowed? A dry call on a
/// user that cannot exist tells: Cognito answers UserNotFoundException only
/// once IAM has let the call through, so nobody is signed out to find out.
async fn sign_out_check(cognito: &aws_sdk_cognitoidentityprovider::Client, pool_id: &str) -> Check {
    let nobody = format!("reset-worker-preflight-{:016x}", fastrand::u64(..));
    let result = cognito
        .admin_user_global_sign_out()
        .user_pool_id(pool_id)
        .username(nobody)
        .send()
        .await;
    let Err(err) = result else {
        return check("sign-out", Level::Pass, "AdminUserGlobalSignOut is allowed");
    };
    match err.code().map(ErrorCode::from_aws_code) {
        Some(ErrorCode::UserNotFound) => check(
            "sign-out",
            Level::Pass,
            "AdminUserGlobalSignOut is allowed (a dry call on a non-existent user answered UserNotFoundException)",
        ),
        Some(ErrorCode::AccessDenied) => check(
            "sign-out",
            Level::Fail,
            "AdminUserGlobalSignOut is denied: grant cognito-idp:AdminUserGlobalSignOut on the pool \
             (deploy/iam/policy.json), or the campaign halts after its first reset",
        ),
        _ => check(
            "sign-out",
            Level::Fail,
            format!("AdminUserGlobalSignOut: {}", DisplayErrorContext(&err)),
        ),
    }
}

/// The ledger: reachable, and (DynamoDB) the table's keys are right.
pub async fn ledger_check(settings: &Settings, sdk: &aws_config::SdkConfig) -> Check {
    let l = &settings.ledger;
    let ledger = match Ledger::open(l, || dynamodb::build_client(sdk)) {
        Ok(ledger) => ledger,
        Err(err) => return check("ledger", Level::Fail, err.to_string()),
    };
    let place = match l.backend {
        LedgerBackend::Sqlite => format!("sqlite {}", l.path.display()),
        LedgerBackend::Dynamodb => format!("dynamodb table `{}`", l.table),
        LedgerBackend::Memory => {
            return check(
                "ledger",
                Level::Warn,
                "memory: forgotten on exit and not shared; a restart, a second replica or a \
                 re-run can email users a second time",
            );
        }
    };
    match ledger.check().await {
        Ok(()) => check(
            "ledger",
            Level::Pass,
            format!("{place} reachable; entries kept {} days", l.retention_days),
        ),
        Err(err) => check("ledger", Level::Fail, format!("{place}: {err}")),
    }
}

/// Runs `reset-worker preflight`: prints every check; fails when any failed.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let sdk = crate::aws::load_sdk_config().await;
    let queue = super::queue_with(settings, &sdk);
    let cognito = crate::aws::cognito::build_client(&sdk, &settings.cognito);
    let mut checks = checks(settings, &queue, &cognito).await;
    checks.push(ledger_check(settings, &sdk).await);
    for c in &checks {
        println!("{:<4}  {:<22} {}", c.level, c.name, c.detail);
    }
    let failed = checks.iter().filter(|c| c.level == Level::Fail).count();
    if failed > 0 {
        anyhow::bail!("preflight: {failed} checks failed");
    }
    Ok(())
}
