//! The protobuf codec of every generated client and server: prost's, with a
//! smaller first buffer per call.
//!
//! tonic gives each call an 8 KiB encode buffer and an 8 KiB decode buffer.
//! Gitaly's requests and replies that the replicator sends and reads are a
//! few hundred bytes, and a consumer keeps hundreds of calls in flight, so
//! those buffers were a fifth of its heap at its peak. A buffer still grows
//! to fit a larger message.

use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// The first size of each call's encode and decode buffer.
pub const FIRST_BUFFER_BYTES: usize = 1024;
/// tonic's default: how much a streaming call encodes before it yields.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// [`ProstCodec`] with [`FIRST_BUFFER_BYTES`] buffers.
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(FIRST_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
