//! Raw WebSocket frames a well-behaved client library would never send (an unfinished frame,
//! an unfinished fragmented message), written under a tungstenite stream, and the Close that
//! answers them. Shared by the inbound and outbound limit tests.

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::DEADLINE;

/// The next Close frame's code and reason (data and pings are skipped).
pub async fn close_of<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> (u16, String) {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a Close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => panic!("a Close without a code"),
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

/// Writes `bytes` under `ws`, straight to its stream.
async fn write_raw<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, bytes: &[u8]) {
    let io = ws.get_mut();
    io.write_all(bytes).await.unwrap();
    io.flush().await.unwrap();
}

/// Writes the head of a masked binary frame announcing `len` bytes, then `sent` of them, and
/// stops there: an unfinished message. The proxy may close the connection while the bytes are
/// written (the memory budget refusing them): a write cut short is left to the caller's read.
pub async fn start_frame<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, len: u64, sent: usize) {
    let mut head = vec![0x82u8, 0x80 | 127];
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    write_raw(ws, &head).await;
    let io = ws.get_mut();
    if io.write_all(&vec![0u8; sent]).await.is_ok() {
        let _ = io.flush().await;
    }
}

/// Writes one whole masked text frame without FIN (`text`, at most 125 bytes): the first
/// fragment of a message whose end never comes.
pub async fn start_fragmented<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    assert!(text.len() <= 125);
    // Opcode text, FIN clear; masked with a zero key, so the payload is as written.
    let mut frame = vec![0x01u8, 0x80 | text.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(text.as_bytes());
    write_raw(ws, &frame).await;
}

/// Writes a masked Ping (empty), which may come between the fragments of a message.
pub async fn ping<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    write_raw(ws, &[0x89, 0x80, 0, 0, 0, 0]).await;
}

/// How many of `streams` read a Close within 500 ms; each such Close must carry `code`.
pub async fn count_closed_with<S: AsyncRead + AsyncWrite + Unpin>(
    streams: &mut [WebSocketStream<S>],
    code: u16,
) -> usize {
    let mut closed = 0;
    for ws in streams {
        if let Ok(Some(Ok(Message::Close(Some(f))))) =
            tokio::time::timeout(std::time::Duration::from_millis(500), ws.next()).await
        {
            assert_eq!(u16::from(f.code), code, "{f:?}");
            closed += 1;
        }
    }
    closed
}
