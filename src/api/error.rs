//! [`ApiError`]: every failure of a handler, as problem+json (RFC 9457) that never leaks
//! internals.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::openapi::{PROBLEM_JSON, Problem};
use crate::session::BotError;

/// An API error, rendered as problem+json.
#[derive(Debug)]
pub enum ApiError {
    /// 401.
    Unauthorized,
    /// 403: a valid token without the scope.
    Forbidden,
    /// 429, with the seconds to wait.
    TooManyRequests(u64, String),
    /// 404, naming what.
    NotFound(String),
    /// 409.
    Conflict(String),
    /// 422.
    Invalid(String),
    /// 413, with the limit in bytes.
    PayloadTooLarge(usize),
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 421: a `Host` this API does not answer to.
    MisdirectedHost,
    /// 503: what the request needs is not there now (the component link), naming it.
    Unavailable(String),
    /// 500; the cause is logged, not returned.
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::MisdirectedHost => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let detail = match &self {
            ApiError::Unauthorized => "a valid bearer token is required".to_owned(),
            ApiError::Forbidden => "this token does not reach that resource".to_owned(),
            ApiError::TooManyRequests(_, what) => what.clone(),
            ApiError::NotFound(what) => format!("{what} not found"),
            ApiError::Conflict(what) | ApiError::Invalid(what) | ApiError::Unavailable(what) => {
                what.clone()
            }
            ApiError::PayloadTooLarge(limit) => {
                format!("the request body is larger than {limit} bytes (admin.max_body_bytes)")
            }
            ApiError::RequestTimeout => {
                "the request body did not arrive in time (admin.body_timeout_secs)".to_owned()
            }
            ApiError::MisdirectedHost => {
                "this Host is not one the admin API answers to (admin.allowed_hosts)".to_owned()
            }
            ApiError::Internal(cause) => {
                tracing::error!(cause, "admin API internal error");
                "internal error; see the component log".to_owned()
            }
        };
        let mut resp = problem(status, &detail);
        if let ApiError::TooManyRequests(secs, _) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// A problem+json answer (RFC 9457) with this status and detail.
pub fn problem(status: StatusCode, detail: &str) -> Response {
    let body = Problem {
        kind: "about:blank".into(),
        title: status.canonical_reason().unwrap_or("error").into(),
        status: status.as_u16(),
        detail: detail.into(),
    };
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<BotError> for ApiError {
    fn from(e: BotError) -> Self {
        match e {
            BotError::InvalidLocalpart(_) => ApiError::Invalid(e.to_string()),
            BotError::Duplicate(_) => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}
