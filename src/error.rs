//! The one error type of the request path, and the table that turns it into a status code,
//! a metric cause label and a retry decision.
//!
//! Every failure a client can see is a variant here; `status()` is a match without a catch-all
//! arm so that adding a cause forces a decision about its status.

use http::StatusCode;

/// Why a proxied request failed. Variants map 1:1 to the spec's error causes.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request line or head is malformed (bad path encoding, NUL/CR/LF, no Host).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request URI is longer than `limits.max_uri`.
    #[error("request URI too long")]
    UriTooLong,
    /// The request body is larger than `limits.max_body`.
    #[error("request body larger than max_body")]
    BodyTooLarge,
    /// The client stopped sending its body for longer than `limits.body_timeout`.
    #[error("timed out reading the request body")]
    BodyTimeout,
    /// The client connection failed while we read its body.
    #[error("client body read failed: {0}")]
    BodyRead(String),
    /// Spooling a large body to a temporary file failed.
    #[error("could not buffer the request body: {0}")]
    BodySpool(#[source] std::io::Error),
    /// No vhost matches the Host and there is no `"*"` default, or the path maps to nothing.
    #[error("not found")]
    NotFound,
    /// Every endpoint of the pool is down, ejected or draining.
    #[error("no healthy endpoint")]
    NoHealthy,
    /// The pool's wait queue is full.
    #[error("queue full")]
    QueueFull,
    /// The request waited `queue.timeout` without getting an FPM connection.
    #[error("queue timeout")]
    QueueTimeout,
    /// Connecting to FPM failed (refused, unreachable, timed out).
    #[error("connect to {endpoint} failed: {source}")]
    Connect {
        /// The endpoint's label.
        endpoint: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// FPM closed or reset the connection before the response head was complete.
    #[error("FPM closed the connection early: {0}")]
    UpstreamReset(String),
    /// FPM sent bytes that are not valid FastCGI or CGI.
    #[error("malformed FastCGI response: {0}")]
    UpstreamProtocol(String),
    /// FPM's response head exceeded `limits.max_response_header`.
    #[error("FPM response header larger than max_response_header")]
    HeaderTooBig,
    /// FPM stayed silent for `timeouts.read`.
    #[error("FPM did not answer within the read timeout")]
    ReadTimeout,
    /// A write to FPM blocked for `timeouts.send`.
    #[error("writing to FPM timed out")]
    SendTimeout,
    /// FPM answered FCGI_OVERLOADED (or another refusal) in END_REQUEST.
    #[error("FPM refused the request: {0}")]
    UpstreamRefused(&'static str),
}

impl ProxyError {
    /// The HTTP status the client receives.
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            BadRequest(_) => StatusCode::BAD_REQUEST,
            UriTooLong => StatusCode::URI_TOO_LONG,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            BodyRead(_) => StatusCode::BAD_REQUEST,
            BodySpool(_) => StatusCode::INTERNAL_SERVER_ERROR,
            NotFound => StatusCode::NOT_FOUND,
            NoHealthy | QueueFull | QueueTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Connect { .. } | UpstreamReset(_) | UpstreamProtocol(_) | HeaderTooBig => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamRefused(_) => StatusCode::SERVICE_UNAVAILABLE,
            ReadTimeout | SendTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `cause` label of `fpmgate_gateway_errors_total` and of log lines.
    pub fn cause(&self) -> &'static str {
        use ProxyError::*;
        match self {
            BadRequest(_) => "bad_request",
            UriTooLong => "uri_too_long",
            BodyTooLarge => "body_too_large",
            BodyTimeout => "body_timeout",
            BodyRead(_) => "body_read",
            BodySpool(_) => "body_spool",
            NotFound => "not_found",
            NoHealthy => "no_healthy",
            QueueFull => "queue_full",
            QueueTimeout => "queue_timeout",
            Connect { .. } => "connect",
            UpstreamReset(_) => "reset",
            UpstreamProtocol(_) => "protocol",
            HeaderTooBig => "header_too_big",
            ReadTimeout => "read_timeout",
            SendTimeout => "send_timeout",
            UpstreamRefused(_) => "overloaded",
        }
    }

    /// True for the gateway errors (502/503/504) that are counted by cause.
    pub fn is_gateway(&self) -> bool {
        matches!(self.status().as_u16(), 502..=504)
    }

    /// The short plain-text body sent with the error status.
    pub fn body(&self) -> &'static str {
        match self.status().as_u16() {
            400 => "400 Bad Request\n",
            404 => "404 Not Found\n",
            408 => "408 Request Timeout\n",
            413 => "413 Content Too Large\n",
            414 => "414 URI Too Long\n",
            502 => "502 Bad Gateway\n",
            503 => "503 Service Unavailable\n",
            504 => "504 Gateway Timeout\n",
            _ => "500 Internal Server Error\n",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_cause_table() {
        let e = ProxyError::Connect {
            endpoint: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(e.status(), 502);
        assert_eq!(e.cause(), "connect");
        assert_eq!(ProxyError::QueueFull.status(), 503);
        assert_eq!(ProxyError::QueueTimeout.cause(), "queue_timeout");
        assert_eq!(ProxyError::ReadTimeout.status(), 504);
        assert_eq!(ProxyError::HeaderTooBig.cause(), "header_too_big");
        assert_eq!(ProxyError::BodyTooLarge.status(), 413);
        assert!(ProxyError::NoHealthy.is_gateway());
        assert!(!ProxyError::NotFound.is_gateway());
        assert_eq!(ProxyError::UriTooLong.body(), "414 URI Too Long\n");
    }
}
