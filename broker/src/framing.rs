//! Reading and writing frames on QUIC streams. Lengths are checked by
//! `FrameHeader::decode` before any buffer is sized from them.

use arrowbus_wire::codec::Message;
use arrowbus_wire::{
    decode_control, encode_frame, Frame, FrameError, FrameHeader, FRAME_HEADER_BYTES,
};
use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
}

/// Read one frame; `Ok(None)` when the peer finished the stream cleanly
/// between frames.
pub async fn read_frame<M: Message>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<Frame<M>>, ReadError> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(FrameError::Truncated {
                expected: FRAME_HEADER_BYTES,
                got,
            }
            .into())
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let header = FrameHeader::decode(&head, M::DIRECTION)?;
    let control = read_exact(recv, header.control_len as usize).await?;
    let msg = decode_control::<M>(&control)?;
    let body = read_exact(recv, header.body_len as usize).await?;
    Ok(Some(Frame { msg, body }))
}

async fn read_exact(recv: &mut quinn::RecvStream, len: usize) -> Result<Vec<u8>, ReadError> {
    arrowbus_quic::read_exact_vec(recv, len)
        .await
        .map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(got) => {
                ReadError::Frame(FrameError::Truncated { expected: len, got })
            }
            quinn::ReadExactError::ReadError(e) => ReadError::Stream(e),
        })
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// Write one frame; the body is sent from the caller's buffer, uncopied.
pub async fn write_frame<M: Message>(
    send: &mut quinn::SendStream,
    msg: &M,
    body: Bytes,
) -> Result<(), WriteError> {
    write_frame_parts(send, msg, [body]).await
}

/// Write one frame whose body is the concatenation of `parts` (a stored
/// record's header and body), each sent from its own buffer, uncopied.
pub async fn write_frame_parts<M: Message, const N: usize>(
    send: &mut quinn::SendStream,
    msg: &M,
    parts: [Bytes; N],
) -> Result<(), WriteError> {
    let body_len = parts.iter().map(Bytes::len).sum();
    let head = Bytes::from(encode_frame(msg, body_len)?);
    let mut chunks = Vec::with_capacity(N + 1);
    chunks.push(head);
    chunks.extend(parts);
    send.write_all_chunks(&mut chunks).await?;
    Ok(())
}
