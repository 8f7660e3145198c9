//! A small Chrome DevTools Protocol client: one WebSocket to the browser,
//! commands matched to their replies by id, pages driven through flat
//! sessions (`Target.attachToTarget {flatten: true}`).
//!
//! Only what the browser tests need: open a page in its own browser context,
//! navigate, evaluate JavaScript, take a screenshot, and keep the page's
//! console messages and uncaught exceptions for failure reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply = Result<Value, String>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// How long one command may take unless the caller says otherwise.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_EVENTS: usize = 2000;

/// Events kept for diagnostics; the rest (network, lifecycle) are dropped.
const KEPT_EVENTS: [&str; 6] = [
    "Runtime.consoleAPICalled",
    "Runtime.exceptionThrown",
    "Log.entryAdded",
    "Inspector.detached",
    "Inspector.targetCrashed",
    "Target.detachedFromTarget",
];

/// One DevTools connection to a browser.
pub struct Cdp {
    sink: tokio::sync::Mutex<SplitSink<Ws, Message>>,
    pending: Pending,
    next_id: AtomicU64,
    events: Arc<Mutex<Vec<Value>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Cdp {
    /// Connects to the browser endpoint (`ws://.../devtools/browser/...`).
    pub async fn connect(ws_url: &str) -> Result<Arc<Cdp>, String> {
        let (ws, _) = tokio::time::timeout(CALL_TIMEOUT, connect_async(ws_url))
            .await
            .map_err(|_| format!("connecting to {ws_url} timed out"))?
            .map_err(|e| format!("connecting to {ws_url}: {e}"))?;
        Ok(Cdp::over(ws))
    }

    /// Like [`Cdp::connect`], over a TCP connection to the endpoint that the caller opened,
    /// e.g. from inside the network namespace the browser runs in (a socket stays in the
    /// namespace it was made in, whichever thread uses it). Call within a tokio runtime.
    pub async fn connect_over(ws_url: &str, tcp: std::net::TcpStream) -> Result<Arc<Cdp>, String> {
        tcp.set_nonblocking(true)
            .map_err(|e| format!("connecting to {ws_url}: {e}"))?;
        let tcp = TcpStream::from_std(tcp).map_err(|e| format!("connecting to {ws_url}: {e}"))?;
        let handshake = tokio_tungstenite::client_async(ws_url, MaybeTlsStream::Plain(tcp));
        let (ws, _) = tokio::time::timeout(CALL_TIMEOUT, handshake)
            .await
            .map_err(|_| format!("WebSocket handshake with {ws_url} timed out"))?
            .map_err(|e| format!("WebSocket handshake with {ws_url}: {e}"))?;
        Ok(Cdp::over(ws))
    }

    fn over(ws: Ws) -> Arc<Cdp> {
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (p, ev) = (Arc::clone(&pending), Arc::clone(&events));
        let reader = tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let text = match msg {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    let reply = match v.get("error") {
                        Some(e) => Err(format!(
                            "{} ({})",
                            e.get("message").and_then(Value::as_str).unwrap_or("error"),
                            e.get("data").and_then(Value::as_str).unwrap_or_default()
                        )),
                        None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
                    };
                    if let Some(tx) = p.lock().unwrap().remove(&id) {
                        let _ = tx.send(reply);
                    }
                } else if KEPT_EVENTS.contains(&v["method"].as_str().unwrap_or_default()) {
                    let mut events = ev.lock().unwrap();
                    if events.len() >= MAX_EVENTS {
                        events.remove(0);
                    }
                    events.push(v);
                }
            }
            // Dropping the senders fails every command still waiting.
            p.lock().unwrap().clear();
        });
        Arc::new(Cdp {
            sink: tokio::sync::Mutex::new(sink),
            pending,
            next_id: AtomicU64::new(1),
            events,
            reader,
        })
    }

    /// Sends `method` (to a page when `session` is given) and waits for its
    /// result, at most `timeout`.
    pub async fn call_with(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let sent = self
            .sink
            .lock()
            .await
            .send(Message::text(msg.to_string()))
            .await;
        if let Err(e) = sent {
            self.pending.lock().unwrap().remove(&id);
            return Err(format!("{method}: cannot send: {e}"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply.map_err(|e| format!("{method}: {e}")),
            Ok(Err(_)) => Err(format!("{method}: the DevTools connection closed")),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(format!("{method}: no reply within {timeout:?}"))
            }
        }
    }

    /// A browser-level command.
    pub async fn call(&self, method: &str, params: Value) -> Reply {
        self.call_with(None, method, params, CALL_TIMEOUT).await
    }

    /// Opens `about:blank` in a new window of a new browser context (its own
    /// cookies and storage, and a visible, foreground page) and attaches to
    /// it.
    pub async fn new_page(self: &Arc<Self>, label: &str) -> Result<Page, String> {
        let context = self
            .call(
                "Target.createBrowserContext",
                json!({ "disposeOnDetach": true }),
            )
            .await?;
        let context = context["browserContextId"]
            .as_str()
            .ok_or("Target.createBrowserContext: no browserContextId")?
            .to_owned();
        let target = self
            .call(
                "Target.createTarget",
                json!({
                    "url": "about:blank",
                    "browserContextId": context,
                    "newWindow": true,
                    "width": 1280,
                    "height": 900,
                }),
            )
            .await?;
        let target = target["targetId"]
            .as_str()
            .ok_or("Target.createTarget: no targetId")?
            .to_owned();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": &target, "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .ok_or("Target.attachToTarget: no sessionId")?
            .to_owned();
        let page = Page {
            cdp: Arc::clone(self),
            session,
            target,
            label: label.to_owned(),
        };
        page.call("Runtime.enable", json!({})).await?;
        page.call("Log.enable", json!({})).await?;
        page.call("Page.enable", json!({})).await?;
        Ok(page)
    }
}

impl Drop for Cdp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One attached page.
pub struct Page {
    cdp: Arc<Cdp>,
    session: String,
    target: String,
    /// A name for messages ("alice").
    pub label: String,
}

impl Page {
    pub async fn call(&self, method: &str, params: Value) -> Reply {
        self.cdp
            .call_with(Some(&self.session), method, params, CALL_TIMEOUT)
            .await
    }

    /// Closes the page (its window and what runs in it).
    pub async fn close(&self) -> Result<(), String> {
        self.cdp
            .call("Target.closeTarget", json!({ "targetId": self.target }))
            .await
            .map(drop)
    }

    /// Runs `source` in every new document of this page before its own
    /// scripts.
    pub async fn add_init_script(&self, source: &str) -> Result<(), String> {
        self.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": source }),
        )
        .await
        .map(drop)
    }

    /// Starts loading `url`; fails if the browser could not even fetch it.
    pub async fn navigate(&self, url: &str) -> Result<(), String> {
        let r = self.call("Page.navigate", json!({ "url": url })).await?;
        match r.get("errorText").and_then(Value::as_str) {
            Some(e) if !e.is_empty() => Err(format!("Page.navigate {url}: {e}")),
            _ => Ok(()),
        }
    }

    /// Evaluates `expression` (awaiting a promise it returns) and returns its
    /// value as JSON; a thrown exception is an error with its description.
    pub async fn eval(&self, expression: &str) -> Reply {
        self.eval_within(expression, CALL_TIMEOUT).await
    }

    pub async fn eval_within(&self, expression: &str, timeout: Duration) -> Reply {
        let r = self
            .cdp
            .call_with(
                Some(&self.session),
                "Runtime.evaluate",
                json!({
                    "expression": expression,
                    "awaitPromise": true,
                    "returnByValue": true,
                }),
                timeout,
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex["exception"]["description"]
                .as_str()
                .or_else(|| ex["text"].as_str())
                .unwrap_or("exception");
            return Err(format!("{}: evaluation threw: {text}", self.label));
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// A PNG of what the page shows.
    pub async fn screenshot_png(&self) -> Result<Vec<u8>, String> {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = r["data"]
            .as_str()
            .ok_or("Page.captureScreenshot: no data")?;
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| format!("Page.captureScreenshot: bad base64: {e}"))
    }

    /// This page's uncaught exceptions, one line each.
    pub fn exceptions(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["method"] == "Runtime.exceptionThrown")
            .map(describe_event)
            .collect()
    }

    /// This page's console messages, browser log entries, exceptions and
    /// crashes, one line each, oldest first.
    pub fn console(&self) -> Vec<String> {
        self.events().iter().map(describe_event).collect()
    }

    fn events(&self) -> Vec<Value> {
        self.cdp
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["sessionId"].as_str() == Some(self.session.as_str()))
            .cloned()
            .collect()
    }
}

fn describe_event(e: &Value) -> String {
    let p = &e["params"];
    match e["method"].as_str().unwrap_or_default() {
        "Runtime.consoleAPICalled" => {
            let args: Vec<String> = p["args"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|a| match &a["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => a["description"].as_str().unwrap_or("?").to_owned(),
                    v => v.to_string(),
                })
                .collect();
            format!(
                "console.{}: {}",
                p["type"].as_str().unwrap_or("log"),
                args.join(" ")
            )
        }
        "Runtime.exceptionThrown" => {
            let d = &p["exceptionDetails"];
            format!(
                "uncaught exception: {} {}",
                d["text"].as_str().unwrap_or_default(),
                d["exception"]["description"].as_str().unwrap_or_default()
            )
        }
        "Log.entryAdded" => {
            let entry = &p["entry"];
            format!(
                "browser {} ({}): {} {}",
                entry["level"].as_str().unwrap_or_default(),
                entry["source"].as_str().unwrap_or_default(),
                entry["text"].as_str().unwrap_or_default(),
                entry["url"].as_str().unwrap_or_default()
            )
        }
        other => format!("{other}: {p}"),
    }
}
