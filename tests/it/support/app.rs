//! A test app behind the proxy: records what reaches it, echoes, closes or refuses on demand.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// One upgrade request as the app received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// Every value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How the app answers upgrades.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Accept and echo.
    Echo,
    /// Refuse with this status and body.
    Refuse(u16, &'static str),
}

/// Close frames received: (code, reason), `None` for a Close without a code.
pub type Closes = Arc<Mutex<Vec<Option<(u16, String)>>>>;

/// The running app.
pub struct TestApp {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Close frames the app received (code, reason), `None` for a Close without a code.
    pub closes: Closes,
    mode: Arc<Mutex<Mode>>,
}

impl TestApp {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let closes: Closes = Arc::default();
        let mode = Arc::new(Mutex::new(Mode::Echo));
        let (s, c, m) = (seen.clone(), closes.clone(), mode.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, closes, mode) = (s.clone(), c.clone(), m.clone());
                tokio::spawn(async move {
                    #[allow(clippy::result_large_err)] // the signature is tungstenite's
                    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                        seen.lock().unwrap().push(Seen {
                            path_and_query: req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                            headers: req
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                                .collect(),
                        });
                        if let Mode::Refuse(status, body) = *mode.lock().unwrap() {
                            let mut err = ErrorResponse::new(Some(body.to_owned()));
                            *err.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            err.headers_mut().insert("x-app-reason", "maintenance".parse().unwrap());
                            return Err(err);
                        }
                        if let Some(offered) = req.headers().get("sec-websocket-protocol") {
                            let first = offered.to_str().unwrap().split(',').next().unwrap().trim().to_owned();
                            resp.headers_mut()
                                .insert("sec-websocket-protocol", first.parse().unwrap());
                        }
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            // The app dies: the TCP connection ends without a Close frame.
                            Message::Text(t) if t.as_str() == "vanish" => return,
                            Message::Text(t) if t.starts_with("close:") => {
                                let mut parts = t.splitn(3, ':').skip(1);
                                let code: u16 = parts.next().unwrap().parse().unwrap();
                                let reason = parts.next().unwrap_or("").to_owned();
                                let _ = ws
                                    .send(Message::Close(Some(CloseFrame {
                                        code: code.into(),
                                        reason: reason.into(),
                                    })))
                                    .await;
                            }
                            Message::Text(_) | Message::Binary(_) => {
                                let echoed = ws.send(msg).await;
                                if echoed.is_err() {
                                    break;
                                }
                            }
                            Message::Close(frame) => {
                                closes
                                    .lock()
                                    .unwrap()
                                    .push(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            closes,
            mode,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn last_seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the app saw no request")
    }
}
