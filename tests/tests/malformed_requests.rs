//! Request bodies that a server cannot read, sent as raw bytes over real
//! mutual TLS to both services: a body that does not decode is
//! INVALID_ARGUMENT, one over the message limit RESOURCE_EXHAUSTED, with a
//! message that names the problem and no internal detail.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::marker::PhantomData;

use cmk_hsm_daemon::Limits;
use cmk_proto::{
    control::v1::{KeyRequest, KeyResponse, ListKeysRequest, ListKeysResponse},
    hsm::v1::{DestroyRequest, DestroyResponse},
};
use cmk_tests::{Harness, control_plane::Deployment};
use prost::{
    Message,
    bytes::{Buf, BufMut},
};
use tonic::{
    Code, Request, Status,
    client::Grpc,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Both services' message limit in these tests (the control plane's default).
const LIMIT: usize = 64 << 10;

/// Field 1, length 2, and two bytes that are not UTF-8 (0xc3 starts a
/// two-byte sequence; 0x28 cannot continue it).
const FIELD_1_NOT_UTF8: &[u8] = &[0x0a, 0x02, 0xc3, 0x28];
/// Field 1, length 32, two bytes left.
const FIELD_1_TRUNCATED: &[u8] = &[0x0a, 0x20, b'0', b'0'];
/// Eleven continuation bytes: no varint (the first tag) is that long.
const GARBAGE: &[u8] = &[0xff; 11];
/// Field 1 with wire type 7, which does not exist.
const BAD_WIRE_TYPE: &[u8] = &[0x0f];

/// Sends the request body as given; decodes the response as `M`.
struct RawCodec<M>(PhantomData<M>);

impl<M> Default for RawCodec<M> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<M: Message + Default + Send + 'static> Codec for RawCodec<M> {
    type Encode = Vec<u8>;
    type Decode = M;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder<M>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder<M> {
        ResponseDecoder(PhantomData)
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

struct ResponseDecoder<M>(PhantomData<M>);

impl<M: Message + Default> Decoder for ResponseDecoder<M> {
    type Item = M;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<M>, Status> {
        let message = M::decode(buf.copy_to_bytes(buf.remaining()))
            .map_err(|err| Status::internal(format!("test client: {err}")))?;
        Ok(Some(message))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Calls `path` with `body` as the request message.
async fn call<M: Message + Default + Send + 'static>(
    channel: &Channel,
    path: &'static str,
    body: &[u8],
) -> Result<M, Status> {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        Request::new(body.to_vec()),
        http::uri::PathAndQuery::from_static(path),
        RawCodec::<M>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Asserts the exact code, that the message says `says`, and that it leaks
/// nothing internal.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, says: &str) {
    let status = result.expect_err("a malformed request must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    let message = status.message();
    assert!(message.contains(says), "{says:?} in {message:?}");
    assert!(
        !message.to_lowercase().contains("internal"),
        "internal detail in {message:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hsm_daemon_blames_the_caller_for_malformed_requests() {
    let harness = Harness::start(Limits {
        max_message_bytes: LIMIT,
        ..Limits::default()
    })
    .await;
    let channel = harness
        .pki
        .channel(harness.daemon.addr, "control-plane")
        .await
        .unwrap();
    const DESTROY: &str = "/cmk.hsm.v1.HsmService/Destroy";
    let destroy = |body: Vec<u8>| {
        let channel = channel.clone();
        async move { call::<DestroyResponse>(&channel, DESTROY, &body).await }
    };

    // A well-formed body through the same raw client reaches the handler.
    let unknown = DestroyRequest {
        key_handle: "0".repeat(32),
        org: cmk_tests::HSM_TEST_ORG.into(),
    };
    assert_eq!(
        destroy(unknown.encode_to_vec()).await.unwrap_err().code(),
        Code::NotFound
    );

    assert_refused(
        destroy(FIELD_1_NOT_UTF8.to_vec()).await,
        Code::InvalidArgument,
        "the request body is not a valid cmk.hsm.v1.DestroyRequest protobuf message: \
         DestroyRequest.key_handle: invalid string value: data is not UTF-8 encoded",
    );
    assert_refused(
        destroy(FIELD_1_TRUNCATED.to_vec()).await,
        Code::InvalidArgument,
        "not a valid cmk.hsm.v1.DestroyRequest protobuf message: \
         DestroyRequest.key_handle: buffer underflow",
    );
    assert_refused(
        destroy(GARBAGE.to_vec()).await,
        Code::InvalidArgument,
        "not a valid cmk.hsm.v1.DestroyRequest protobuf message: invalid varint",
    );
    assert_refused(
        destroy(BAD_WIRE_TYPE.to_vec()).await,
        Code::InvalidArgument,
        "not a valid cmk.hsm.v1.DestroyRequest protobuf message: invalid wire type value: 7",
    );

    let oversized = DestroyRequest {
        key_handle: "0".repeat(LIMIT + 1),
        org: cmk_tests::HSM_TEST_ORG.into(),
    };
    assert_refused(
        destroy(oversized.encode_to_vec()).await,
        Code::ResourceExhausted,
        &format!("the limit is: {LIMIT} bytes"),
    );

    // The connection is still good, and so is the daemon.
    assert_eq!(
        destroy(unknown.encode_to_vec()).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_blames_the_caller_for_malformed_requests() {
    let deployment = Deployment::start().await;
    let channel = deployment
        .hsm
        .pki
        .channel(deployment.addr(), "admin-acme")
        .await
        .unwrap();
    const LIST_KEYS: &str = "/cmk.control.v1.KeyAdminService/ListKeys";
    const GET_KEY: &str = "/cmk.control.v1.KeyAdminService/GetKey";

    // A well-formed body through the same raw client is answered.
    let list = ListKeysRequest {
        org_id: "acme".into(),
    };
    call::<ListKeysResponse>(&channel, LIST_KEYS, &list.encode_to_vec())
        .await
        .unwrap();

    assert_refused(
        call::<ListKeysResponse>(&channel, LIST_KEYS, FIELD_1_NOT_UTF8).await,
        Code::InvalidArgument,
        "the request body is not a valid cmk.control.v1.ListKeysRequest protobuf message: \
         ListKeysRequest.org_id: invalid string value: data is not UTF-8 encoded",
    );
    // org_id "acme", then key_id (field 2) with a lone continuation byte.
    let key_id_not_utf8 = [&[0x0a, 0x04][..], b"acme", &[0x12, 0x01, 0x80]].concat();
    assert_refused(
        call::<KeyResponse>(&channel, GET_KEY, &key_id_not_utf8).await,
        Code::InvalidArgument,
        "the request body is not a valid cmk.control.v1.KeyRequest protobuf message: \
         KeyRequest.key_id: invalid string value: data is not UTF-8 encoded",
    );
    assert_refused(
        call::<KeyResponse>(&channel, GET_KEY, FIELD_1_TRUNCATED).await,
        Code::InvalidArgument,
        "not a valid cmk.control.v1.KeyRequest protobuf message: \
         KeyRequest.org_id: buffer underflow",
    );
    assert_refused(
        call::<KeyResponse>(&channel, GET_KEY, GARBAGE).await,
        Code::InvalidArgument,
        "not a valid cmk.control.v1.KeyRequest protobuf message: invalid varint",
    );
    assert_refused(
        call::<KeyResponse>(&channel, GET_KEY, BAD_WIRE_TYPE).await,
        Code::InvalidArgument,
        "not a valid cmk.control.v1.KeyRequest protobuf message: invalid wire type value: 7",
    );

    let oversized = KeyRequest {
        org_id: "acme".into(),
        key_id: "k".repeat(LIMIT),
    };
    assert_refused(
        call::<KeyResponse>(&channel, GET_KEY, &oversized.encode_to_vec()).await,
        Code::ResourceExhausted,
        &format!("the limit is: {LIMIT} bytes"),
    );

    // The connection is still good.
    call::<ListKeysResponse>(&channel, LIST_KEYS, &list.encode_to_vec())
        .await
        .unwrap();
}
