//! The WebSocket wire format (RFC 6455 §5) as the relay needs it: frame headers parsed and
//! checked, text checked as UTF-8 across fragments, Close payloads checked, and the few frames
//! wsgate writes itself (Ping, Pong, Close). Data frames are never rebuilt: the relay forwards
//! their bytes as they came, mask included, since a client's frames go on to a server and a
//! server's to a client on the other leg too. A leaf: depends on `std` and aws-lc-rs (mask keys).

/// What is wrong with what a peer sent; the relay closes that peer with [`WireError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame breaks the protocol (1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A frame or message is larger than allowed (1009).
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooBig {
        /// "frame" or "message".
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// Text that is not UTF-8 (1007).
    #[error("invalid UTF-8 in a text message")]
    Utf8,
}

impl WireError {
    /// The close code the sender gets.
    pub fn code(&self) -> u16 {
        match self {
            WireError::Protocol(_) => 1002,
            WireError::TooBig { .. } => 1009,
            WireError::Utf8 => 1007,
        }
    }

    /// The close reason the sender gets.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Protocol(_) => "protocol error",
            WireError::TooBig { .. } => "message too big",
            WireError::Utf8 => "invalid UTF-8 in a text message",
        }
    }
}

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// 0x0: the next fragment of a message.
    Continuation,
    /// 0x1.
    Text,
    /// 0x2.
    Binary,
    /// 0x8.
    Close,
    /// 0x9.
    Ping,
    /// 0xA.
    Pong,
}

impl Opcode {
    /// Whether this is a control frame (Close, Ping, Pong).
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The last frame of its message.
    pub fin: bool,
    /// What the frame is.
    pub opcode: Opcode,
    /// The masking key, when the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Bytes of the header.
    pub header_len: usize,
    /// Bytes of the payload.
    pub payload_len: u64,
}

impl Header {
    /// Bytes of the whole frame.
    pub fn frame_len(&self) -> u64 {
        self.header_len as u64 + self.payload_len
    }
}

/// Parses the header at the start of `buf` from a peer whose frames must be masked (`masked`:
/// the peer is a client) or must not be (a server). `Ok(None)`: not all of it is there yet.
/// Checks what the header alone can tell: reserved bits (no extension is ever negotiated),
/// opcodes, the mask, control frames' size and fragmentation, and `max_frame`.
#[inline]
pub fn parse_header(buf: &[u8], masked: bool, max_frame: usize) -> Result<Option<Header>, WireError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WireError::Protocol("reserved bits set without an extension"));
    }
    let opcode = match b0 & 0x0f {
        0x0 => Opcode::Continuation,
        0x1 => Opcode::Text,
        0x2 => Opcode::Binary,
        0x8 => Opcode::Close,
        0x9 => Opcode::Ping,
        0xA => Opcode::Pong,
        _ => return Err(WireError::Protocol("reserved opcode")),
    };
    let fin = b0 & 0x80 != 0;
    let has_mask = b1 & 0x80 != 0;
    if has_mask != masked {
        return Err(WireError::Protocol(if masked {
            "unmasked frame from a client"
        } else {
            "masked frame from a server"
        }));
    }
    let (payload_len, mut at) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                let len = u64::from_be_bytes(n);
                if len >> 63 != 0 {
                    return Err(WireError::Protocol("payload length with its top bit set"));
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || payload_len > 125) {
        return Err(WireError::Protocol(if fin {
            "control frame longer than 125 bytes"
        } else {
            "fragmented control frame"
        }));
    }
    if payload_len > max_frame as u64 {
        return Err(WireError::TooBig {
            what: "frame",
            size: payload_len,
            limit: max_frame,
        });
    }
    let mask = match has_mask {
        true => match buf.get(at..at + 4) {
            Some(k) => {
                at += 4;
                Some([k[0], k[1], k[2], k[3]])
            }
            None => return Ok(None),
        },
        false => None,
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len,
    }))
}

/// XORs `data` with `mask`, as if `data` started `offset` bytes into a payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

/// Checks a text message as UTF-8 piece by piece: a character may be split across frames.
#[derive(Debug, Default, Clone)]
pub struct Utf8Check {
    pending: [u8; 4],
    len: u8,
}

/// Bytes of the UTF-8 sequence that `lead` starts (1 for a byte that starts none).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

impl Utf8Check {
    /// Checks the next piece of the message (`payload` as sent, unmasked with `mask` from
    /// `offset` if given). Fails as soon as the bytes cannot be UTF-8, whatever follows.
    pub fn feed(&mut self, payload: &[u8], mask: Option<[u8; 4]>, offset: usize) -> Result<(), WireError> {
        match mask {
            None => self.feed_plain(payload),
            Some(key) => {
                let mut scratch = [0u8; 512];
                for (i, chunk) in payload.chunks(scratch.len()).enumerate() {
                    let plain = &mut scratch[..chunk.len()];
                    plain.copy_from_slice(chunk);
                    apply_mask(plain, key, offset + i * 512);
                    self.feed_plain(plain)?;
                }
                Ok(())
            }
        }
    }

    fn feed_plain(&mut self, mut bytes: &[u8]) -> Result<(), WireError> {
        if self.len > 0 {
            let want = sequence_len(self.pending[0]);
            let take = (want - self.len as usize).min(bytes.len());
            let start = self.len as usize;
            self.pending[start..start + take].copy_from_slice(&bytes[..take]);
            self.len += take as u8;
            bytes = &bytes[take..];
            let seq = &self.pending[..self.len as usize];
            match std::str::from_utf8(seq) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() && (self.len as usize) < want => return Ok(()),
                Err(_) => return Err(WireError::Utf8),
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &bytes[e.valid_up_to()..];
                self.pending[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(WireError::Utf8),
        }
    }

    /// The message ended: no character may be left unfinished.
    pub fn finish(&mut self) -> Result<(), WireError> {
        let unfinished = self.len > 0;
        self.len = 0;
        match unfinished {
            true => Err(WireError::Utf8),
            false => Ok(()),
        }
    }
}

/// Whether a peer may send `code` in a Close frame (RFC 6455 §7.4, as tungstenite allows).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

/// Checks an unmasked Close payload; returns its code and reason (`None`: no code).
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, WireError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WireError::Protocol("Close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return Err(WireError::Protocol("Close code not allowed"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WireError::Utf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Appends a control frame of wsgate's own to `out`, masked with a fresh key when the peer is
/// a server (`mask`). `payload` is at most 125 bytes (longer is cut there).
pub fn push_control(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8], mask: bool) {
    let payload = &payload[..payload.len().min(125)];
    let op = match opcode {
        Opcode::Close => 0x8,
        Opcode::Ping => 0x9,
        Opcode::Pong => 0xA,
        Opcode::Continuation => 0x0,
        Opcode::Text => 0x1,
        Opcode::Binary => 0x2,
    };
    out.push(0x80 | op);
    out.push(payload.len() as u8 | if mask { 0x80 } else { 0 });
    let start = out.len();
    match mask {
        true => {
            let key = mask_key();
            out.extend_from_slice(&key);
            out.extend_from_slice(payload);
            apply_mask(&mut out[start + 4..], key, 0);
        }
        false => out.extend_from_slice(payload),
    }
}

/// Appends a Close frame with `code` and `reason` (see [`push_control`]).
pub fn push_close(out: &mut Vec<u8>, code: Option<u16>, reason: &str, mask: bool) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    if let Some(code) = code {
        payload.extend_from_slice(&code.to_be_bytes());
        // Cut at 123 bytes on a character boundary.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..end]);
    }
    push_control(out, Opcode::Close, &payload, mask);
}

/// A masking key for a frame wsgate sends to a server: RFC 6455 asks for keys a peer cannot
/// predict. Only wsgate's own Pings, Pongs and Closes need one (forwarded frames keep theirs),
/// so the system's generator is cheap enough.
fn mask_key() -> [u8; 4] {
    let mut key = [0x5a; 4];
    let _ = aws_lc_rs::rand::fill(&mut key);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_masked_binary_header_parses_with_its_key() {
        let h = parse_header(&[0x82, 0x85, 1, 2, 3, 4, 9], true, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(
            h,
            Header {
                fin: true,
                opcode: Opcode::Binary,
                mask: Some([1, 2, 3, 4]),
                header_len: 6,
                payload_len: 5
            }
        );
    }

    #[test]
    fn extended_lengths_parse_and_an_incomplete_header_waits() {
        let mut b = vec![0x02, 126, 0x01, 0x00];
        let h = parse_header(&b, false, 1 << 20).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.header_len, h.payload_len),
            (false, Opcode::Binary, 4, 256)
        );
        b = vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        let h = parse_header(&b, false, 1 << 20).unwrap().unwrap();
        assert_eq!((h.header_len, h.payload_len), (10, 65536));
        for cut in 0..b.len() {
            assert_eq!(parse_header(&b[..cut], false, 1 << 20), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_header(&[0x82, 0x80, 1, 2], true, 10), Ok(None));
    }

    #[test]
    fn headers_that_break_the_protocol_are_refused_with_1002() {
        let refused = [
            (&[0x82u8, 0x00][..], true, "unmasked frame from a client"),
            (&[0x82, 0x80, 0, 0, 0, 0][..], false, "masked frame from a server"),
            (&[0xC2, 0x00][..], false, "reserved bits set without an extension"),
            (&[0x83, 0x00][..], false, "reserved opcode"),
            (&[0x8B, 0x00][..], false, "reserved opcode"),
            (&[0x09, 0x00][..], false, "fragmented control frame"),
            (&[0x89, 126, 0, 126][..], false, "control frame longer than 125 bytes"),
            (
                &[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0][..],
                false,
                "payload length with its top bit set",
            ),
        ];
        for (bytes, masked, why) in refused {
            let err = parse_header(bytes, masked, usize::MAX).unwrap_err();
            assert_eq!(err, WireError::Protocol(why), "{bytes:x?}");
            assert_eq!(err.code(), 1002);
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_with_1009_from_its_header() {
        let err = parse_header(&[0x82, 126, 0x04, 0x01], false, 1024).unwrap_err();
        assert_eq!(
            err,
            WireError::TooBig {
                what: "frame",
                size: 1025,
                limit: 1024
            }
        );
        assert_eq!(err.code(), 1009);
        assert!(parse_header(&[0x82, 126, 0x04, 0x00], false, 1024).unwrap().is_some());
    }

    #[test]
    fn utf8_split_anywhere_across_pieces_is_accepted() {
        let text = "héllo wörld — 𝄞 done".as_bytes();
        for cut in 0..=text.len() {
            for cut2 in cut..=text.len() {
                let mut c = Utf8Check::default();
                c.feed(&text[..cut], None, 0).unwrap();
                c.feed(&text[cut..cut2], None, 0).unwrap();
                c.feed(&text[cut2..], None, 0).unwrap();
                c.finish().unwrap();
            }
        }
    }

    #[test]
    fn invalid_utf8_fails_at_once_and_an_unfinished_character_fails_at_the_end() {
        let mut c = Utf8Check::default();
        assert_eq!(c.feed(&[b'a', 0xFF], None, 0), Err(WireError::Utf8));
        // A lead byte then a byte that cannot follow it, split across pieces.
        let mut c = Utf8Check::default();
        c.feed(&[0xE2], None, 0).unwrap();
        assert_eq!(c.feed(&[0x41], None, 0), Err(WireError::Utf8));
        // A surrogate is refused even before its last byte.
        let mut c = Utf8Check::default();
        assert_eq!(c.feed(&[0xED, 0xA0], None, 0), Err(WireError::Utf8));
        let mut c = Utf8Check::default();
        c.feed(&[0xF0, 0x9D], None, 0).unwrap();
        assert_eq!(c.finish(), Err(WireError::Utf8));
    }

    #[test]
    fn masked_text_is_checked_unmasked_from_its_offset() {
        let text = "ünïcödé ".repeat(200);
        let key = [0x11, 0x22, 0x33, 0x44];
        let mut wire = text.as_bytes().to_vec();
        apply_mask(&mut wire, key, 0);
        let mut c = Utf8Check::default();
        let (a, b) = wire.split_at(601);
        c.feed(a, Some(key), 0).unwrap();
        c.feed(b, Some(key), 601).unwrap();
        c.finish().unwrap();
        // The same bytes unmasked with the wrong offset are not text.
        let mut c = Utf8Check::default();
        assert!(c.feed(b, Some(key), 600).is_err() || c.finish().is_err());
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert_eq!(parse_close(&[0x03, 0xE8, b'o', b'k']), Ok(Some((1000, "ok"))));
        assert_eq!(parse_close(&[0x03]).unwrap_err().code(), 1002);
        for bad in [0u16, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000] {
            assert_eq!(parse_close(&bad.to_be_bytes()).unwrap_err().code(), 1002, "{bad}");
        }
        for good in [1000u16, 1001, 1003, 1007, 1011, 1013, 3000, 4999] {
            assert!(parse_close(&good.to_be_bytes()).is_ok(), "{good}");
        }
        assert_eq!(parse_close(&[0x03, 0xE8, 0xFF]).unwrap_err().code(), 1007);
    }

    #[test]
    fn own_frames_parse_back_masked_for_a_server_and_plain_for_a_client() {
        for mask in [false, true] {
            let mut out = Vec::new();
            push_close(&mut out, Some(1001), &"é".repeat(100), mask);
            let h = parse_header(&out, mask, 125).unwrap().unwrap();
            assert_eq!((h.fin, h.opcode), (true, Opcode::Close));
            assert_eq!(h.frame_len() as usize, out.len());
            let mut payload = out[h.header_len..].to_vec();
            if let Some(key) = h.mask {
                apply_mask(&mut payload, key, 0);
            }
            let (code, reason) = parse_close(&payload).unwrap().unwrap();
            assert_eq!(code, 1001);
            assert!(
                payload.len() <= 125 && reason.chars().all(|c| c == 'é'),
                "{}",
                payload.len()
            );
        }
    }
}
