//! The two AWS services the worker talks to, behind small typed facades.
//!
//! - [`sqs`]: the job queue (receive, visibility, dead-letter, send).
//! - [`deleter`]: the batched, retried DeleteMessageBatch of finished messages.
//! - [`resend`]: a received message sent again: dead-letter copies, FIFO deferrals.
//! - [`cognito`]: the reset call, `SecretHash`, and the error codes.

pub mod cognito;
pub mod deleter;
pub mod resend;
pub mod sqs;

use aws_config::{BehaviorVersion, SdkConfig};

/// The default chain: env, profile, IRSA web identity, Pod Identity, IMDS;
/// `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER` apply.
pub async fn load_sdk_config() -> SdkConfig {
    aws_config::load_defaults(BehaviorVersion::latest()).await
}
