//! The mutual-TLS connection to the control plane and the one way every call is
//! made: under the timeout, its status kept whole for [`Error::Status`].

use std::{error::Error as _, future::Future};

use cmk_proto::control::v1::{
    content_key_service_client::ContentKeyServiceClient,
    key_admin_service_client::KeyAdminServiceClient,
};
use tonic::transport::{Channel, Endpoint};

use crate::{
    config::{ConfigError, Connection},
    error::{Error, chain},
};

/// A connected client of both control-plane services.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    settings: Connection,
}

impl Client {
    /// Connects now, so that an unreachable endpoint or a failed handshake is
    /// reported as such before any request.
    pub async fn connect(settings: Connection) -> Result<Self, Error> {
        let tls = cmk_tls::client_config(&settings.tls, &settings.server_name)?;
        let endpoint = Endpoint::from_shared(settings.endpoint.clone())
            .map_err(|err| ConfigError::Endpoint {
                endpoint: settings.endpoint.clone(),
                reason: chain(&err),
            })?
            .tls_config(tls)
            .map_err(Error::TlsSetup)?
            .connect_timeout(settings.timeout);
        // `connect_timeout` bounds the TCP connect; this bounds the handshake too.
        let channel = match tokio::time::timeout(settings.timeout, endpoint.connect()).await {
            Ok(connected) => connected.map_err(|source| Error::Unreachable {
                endpoint: settings.endpoint.clone(),
                source,
            })?,
            Err(_elapsed) => return Err(settings.no_answer()),
        };
        Ok(Self { channel, settings })
    }

    /// The organisation every request names.
    pub fn org(&self) -> String {
        self.settings.org.clone()
    }

    /// The key administration service.
    pub fn admin(&self) -> KeyAdminServiceClient<Channel> {
        KeyAdminServiceClient::new(self.channel.clone())
    }

    /// The content-key service.
    pub fn content(&self) -> ContentKeyServiceClient<Channel> {
        ContentKeyServiceClient::new(self.channel.clone())
    }

    /// Awaits one call, giving up after the timeout with DEADLINE_EXCEEDED.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // Only a status tonic made of a local failure has a source; one the
            // server sent never does.
            Ok(Err(status)) if status.source().is_some() => Err(Error::Interrupted {
                endpoint: self.settings.endpoint.clone(),
                status,
            }),
            Ok(Err(status)) => Err(Error::Status(status)),
            Err(_elapsed) => Err(self.settings.no_answer()),
        }
    }
}

impl Connection {
    /// The error for a control plane that does not answer within the timeout.
    fn no_answer(&self) -> Error {
        Error::Status(tonic::Status::deadline_exceeded(format!(
            "no answer from {} within {} s (--timeout-secs)",
            self.endpoint,
            self.timeout.as_secs()
        )))
    }
}
