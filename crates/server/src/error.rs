//! Errors in OpenAI's shape: `{"error": {"message", "type", "code", "param"}}` with the HTTP
//! status a client library maps to its exception types (400 BadRequestError, 401
//! AuthenticationError, 404 NotFoundError, 413, 429 RateLimitError, 5xx InternalServerError).
//! Messages are for the client: they say what to fix and never carry internals.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    /// Seconds a 429's `Retry-After` asks the client to wait (1 when not set).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            retry_after: None,
        }
    }

    /// Sets a 429's `Retry-After` (OpenAI's SDKs wait what it says before retrying).
    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds.max(1));
        self
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: &'static str) -> ApiError {
        self.param = Some(param);
        self
    }

    /// 400: the request is malformed or asks for something invalid.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }

    pub fn rate_limited(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message).code(code)
    }

    /// 500: something on our side; the details go to the server log, not the client.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
        eprintln!("error: {context}: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("internal error while {context}; see the server log"),
        )
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "code": self.code,
            "param": self.param,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            let secs = self.retry_after.unwrap_or(1);
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(secs));
        }
        // the rest of that request's body may still be on the wire: do not reuse the connection
        if self.status == StatusCode::REQUEST_TIMEOUT {
            r.headers_mut()
                .insert("connection", axum::http::HeaderValue::from_static("close"));
        }
        r
    }
}
