//! Requests a server cannot read are the caller's fault, and their status
//! says so: a body that does not decode is `INVALID_ARGUMENT`, a message over
//! the server's limit `RESOURCE_EXHAUSTED` (gRPC's convention for size
//! limits).
//!
//! tonic and tonic-prost choose `INTERNAL` and `OUT_OF_RANGE` for these, before
//! any handler runs, so no service's error mapping can see them; this layer
//! rewrites them on the way out, once for every service of a server. Both
//! happen while the request is read, before any response message, so for
//! unary and server-streaming calls (all that cmk has) the status is in a
//! trailers-only response: in its headers, with the [`Status`] tonic made it
//! of in its extensions. Statuses sent in trailers are left alone.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use cmk_proto::codec::Undecodable;
use http::HeaderMap;
use tonic::{Code, Status};
use tower_layer::Layer;
use tower_service::Service;

/// Gives requests that do not decode or are too large the codes that blame
/// the caller; see the [module documentation](self). Put it inside the
/// metrics layer, so that the codes counted are the ones sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct MalformedRequestLayer;

impl<S> Layer<S> for MalformedRequestLayer {
    type Service = MalformedRequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MalformedRequestService { inner }
    }
}

/// The service [`MalformedRequestLayer`] wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct MalformedRequestService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for MalformedRequestService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = MalformedRequestFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        MalformedRequestFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`MalformedRequestService`].
    pub struct MalformedRequestFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for MalformedRequestFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = ready!(self.project().inner.poll(cx))?;
        blame_caller(&mut response);
        Poll::Ready(Ok(response))
    }
}

/// Rewrites the status of a trailers-only response when it is one of the two
/// that tonic sends for a request it could not read.
fn blame_caller<B>(response: &mut http::Response<B>) {
    let Some(sent) = response.extensions().get::<Status>() else {
        return;
    };
    // The extension is the status tonic sent only if the headers carry it (a
    // trailers-only response).
    if grpc_status(response.headers()) != Some(sent.code()) {
        return;
    }
    let blamed = if let Some(undecodable) = Undecodable::of(sent) {
        Status::invalid_argument(format!(
            "the request body is not a valid {} protobuf message: {}",
            undecodable.message(),
            undecodable.reason()
        ))
    } else if sent.code() == Code::OutOfRange {
        // tonic's check of a message's length against the server's
        // max_decoding_message_size is the only source of OUT_OF_RANGE here:
        // neither service returns it (their codes are chosen in
        // hsm-daemon/src/error.rs and control-plane/src/error.rs, neither of
        // which makes OUT_OF_RANGE, and the control plane turns one from the
        // HSM daemon into INVALID_ARGUMENT). tonic's message gives the length
        // found and the limit.
        Status::resource_exhausted(sent.message())
    } else {
        return;
    };
    let mut headers = HeaderMap::new();
    // Fails only for metadata or details that are not valid header values;
    // this status has neither, and tonic percent-encodes the message.
    if let Err(err) = blamed.add_header(&mut headers) {
        tracing::warn!(%err, "cannot write the status of a malformed request; sending tonic's");
        return;
    }
    // Replaces grpc-status and grpc-message (both statuses have a message).
    response.headers_mut().extend(headers);
    response.extensions_mut().insert(blamed);
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn blamed(response: http::Response<()>) -> Status {
        let mut response = response;
        blame_caller(&mut response);
        let status = Status::from_header_map(response.headers()).unwrap();
        let extension = response.extensions().get::<Status>().unwrap();
        assert_eq!(extension.code(), status.code());
        assert_eq!(extension.message(), status.message());
        status
    }

    #[test]
    fn undecodable_requests_are_invalid_arguments() {
        use cmk_proto::hsm::v1::DestroyRequest;
        use prost::Message as _;
        // Field 1 (key_handle), length 5, nothing after it.
        let err = DestroyRequest::decode(&[0x0a, 0x05][..]).unwrap_err();
        let mut sent = Status::internal("prost's message");
        sent.set_source(std::sync::Arc::new(Undecodable::new::<DestroyRequest>(err)));
        let status = blamed(sent.into_http());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "the request body is not a valid cmk.hsm.v1.DestroyRequest protobuf message: \
             DestroyRequest.key_handle: buffer underflow"
        );
    }

    #[test]
    fn oversized_requests_are_resource_exhausted() {
        let message =
            "Error, decoded message length too large: found 70000 bytes, the limit is: 65536 bytes";
        let status = blamed(Status::out_of_range(message).into_http());
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), message);
    }

    #[test]
    fn other_statuses_are_left_alone() {
        for sent in [
            Status::internal("failed to decode Protobuf message: buffer underflow"),
            Status::invalid_argument("plaintext is empty"),
            Status::not_found("no key with handle 00"),
        ] {
            let status = blamed(sent.clone().into_http());
            assert_eq!(status.code(), sent.code());
            assert_eq!(status.message(), sent.message());
        }
    }

    #[test]
    fn statuses_in_trailers_are_left_alone() {
        // A response with messages: its status comes in the trailers, and
        // whatever is in its extensions was not sent in these headers.
        let mut response = http::Response::new(());
        response
            .extensions_mut()
            .insert(Status::out_of_range("too large"));
        blame_caller(&mut response);
        assert!(response.headers().is_empty());
    }
}
