//! The server-wide bound on requests in flight: a request beyond it is
//! answered `RESOURCE_EXHAUSTED` at once, before its handler runs, so a flood
//! of calls cannot grow tasks or memory without bound. Per connection,
//! HTTP/2's own `max_concurrent_streams` bounds the calls in flight.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

/// Wraps a server's routes in [`InFlight`].
#[derive(Clone, Debug)]
pub struct InFlightLayer {
    permits: Arc<Semaphore>,
    max: usize,
}

impl InFlightLayer {
    /// At most `max` requests in flight at once, over every connection.
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlight {
            inner,
            permits: self.permits.clone(),
            max: self.max,
        }
    }
}

/// The service [`InFlightLayer`] makes: each request holds a permit until
/// its response is ready.
#[derive(Clone, Debug)]
pub struct InFlight<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for InFlight<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = InFlightFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => InFlightFuture {
                inner: Some(self.inner.call(request)),
                refused: None,
                _permit: Some(permit),
            },
            Err(_) => InFlightFuture {
                inner: None,
                refused: Some(
                    Status::resource_exhausted(format!(
                        "the server is at its limit of {} requests in flight; retry with backoff",
                        self.max
                    ))
                    .into_http(),
                ),
                _permit: None,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`InFlight`].
    pub struct InFlightFuture<F, B> {
        #[pin]
        inner: Option<F>,
        refused: Option<http::Response<B>>,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F, B, E> Future for InFlightFuture<F, B>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            Some(inner) => {
                let response = ready!(inner.poll(cx));
                // Released as soon as the answer is ready, not when this
                // future is dropped.
                this._permit.take();
                Poll::Ready(response)
            }
            None => match this.refused.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    #[tokio::test]
    async fn a_request_beyond_the_limit_is_resource_exhausted_and_its_permit_comes_back() {
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let held = Arc::new(tokio::sync::Mutex::new(Some(held)));
        let slow = tower_service_fn(move |_request: http::Request<()>| {
            let held = held.clone();
            async move {
                if let Some(wait) = held.lock().await.take() {
                    let _ = wait.await;
                }
                Ok::<_, Infallible>(http::Response::new(String::from("ok")))
            }
        });
        let mut service = InFlightLayer::new(1).layer(slow);
        let first = tokio::spawn(service.call(http::Request::new(())));
        tokio::task::yield_now().await;
        let refused = service.call(http::Request::new(())).await.unwrap();
        assert_eq!(
            refused.headers().get("grpc-status").unwrap(),
            &(tonic::Code::ResourceExhausted as i32).to_string()
        );
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().into_body(), "ok");
        // The permit is back: the next request is served.
        let served = service.call(http::Request::new(())).await.unwrap();
        assert_eq!(served.into_body(), "ok");
    }

    /// A service from an async function.
    fn tower_service_fn<F, Fut>(f: F) -> ServiceFn<F>
    where
        F: FnMut(http::Request<()>) -> Fut,
    {
        ServiceFn(f)
    }

    #[derive(Clone)]
    struct ServiceFn<F>(F);

    impl<F, Fut> Service<http::Request<()>> for ServiceFn<F>
    where
        F: FnMut(http::Request<()>) -> Fut,
        Fut: Future<Output = Result<http::Response<String>, Infallible>>,
    {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = Fut;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Fut {
            (self.0)(request)
        }
    }
}
