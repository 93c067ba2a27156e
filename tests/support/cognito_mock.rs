//! Cognito `ForgotPassword` on a wiremock server: the matcher for the call,
//! the answers Cognito gives (as the AWS JSON 1.1 protocol sends them), a
//! SecretHash check, and the calls the server received.

use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Match, Mock, MockBuilder, MockServer, Request, ResponseTemplate};

use super::{FORGOT_PASSWORD_TARGET, secret_hash};

pub const AMZ_JSON: &str = "application/x-amz-json-1.1";

/// Matches a well-formed ForgotPassword call of the AWS JSON 1.1 protocol.
pub fn forgot_password() -> MockBuilder {
    Mock::given(method("POST"))
        .and(path("/"))
        .and(header("x-amz-target", FORGOT_PASSWORD_TARGET))
        .and(header("content-type", AMZ_JSON))
}

/// A code sent by email.
pub fn success() -> ResponseTemplate {
    let body = json!({"CodeDeliveryDetails": {
        "Destination": "a***@e***",
        "DeliveryMedium": "EMAIL",
        "AttributeName": "email",
    }});
    ResponseTemplate::new(200).set_body_raw(body.to_string(), AMZ_JSON)
}

/// An error answer as Cognito sends it: the code in `x-amzn-errortype` and
/// in the body's `__type`.
pub fn cognito_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("x-amzn-errortype", code)
        .set_body_raw(
            json!({"__type": code, "message": message}).to_string(),
            AMZ_JSON,
        )
}

/// Parsed bodies of every request `cognito` received, oldest first, after
/// checking that each one was a ForgotPassword call (nothing else may reach
/// "Cognito").
pub async fn received_calls(cognito: &MockServer) -> Vec<Value> {
    let requests = cognito
        .received_requests()
        .await
        .expect("wiremock request recording is on");
    requests
        .iter()
        .map(|r| {
            let target = r.headers.get("x-amz-target").and_then(|v| v.to_str().ok());
            assert_eq!(
                target,
                Some(FORGOT_PASSWORD_TARGET),
                "unexpected request to Cognito: {}",
                describe(r)
            );
            r.body_json::<Value>().unwrap_or_else(|e| {
                panic!("ForgotPassword body is not JSON ({e}): {}", describe(r))
            })
        })
        .collect()
}

fn describe(r: &Request) -> String {
    format!(
        "{} {} {:?} {}",
        r.method,
        r.url,
        r.headers,
        String::from_utf8_lossy(&r.body)
    )
}

/// The `Username` of each call.
pub fn usernames(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            c["Username"]
                .as_str()
                .unwrap_or_else(|| panic!("call without Username: {c}"))
                .to_string()
        })
        .collect()
}

/// Answers only calls whose `ClientId` is `client_id` and whose `SecretHash`
/// is Base64(HMAC-SHA256(client_secret, username + client id)) for their
/// `Username`.
pub struct ValidSecretHash {
    pub client_id: String,
    pub client_secret: String,
}

impl Match for ValidSecretHash {
    fn matches(&self, request: &Request) -> bool {
        let Ok(body) = request.body_json::<Value>() else {
            return false;
        };
        let (Some(client_id), Some(username), Some(hash)) = (
            body["ClientId"].as_str(),
            body["Username"].as_str(),
            body["SecretHash"].as_str(),
        ) else {
            return false;
        };
        client_id == self.client_id
            && hash == secret_hash(username, &self.client_id, &self.client_secret)
    }
}
