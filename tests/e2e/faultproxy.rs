//! A fault proxy for the store servers (Azurite, the S3 server): it forwards each HTTP/1.1
//! request to the server, one request per connection, and on a schedule drops the connection,
//! answers 500 or 503, stalls, or cuts the response body short. Tested below against a tiny
//! server of its own.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward it and its answer unchanged.
    Pass,
    /// Close the connection without an answer.
    Drop,
    /// Answer this status (500, 503) without asking the server.
    Status(u16),
    /// Wait this long, then forward.
    Stall(Duration),
    /// Forward, then send only the head and half of the answer's body.
    Truncate,
}

struct State {
    schedule: Vec<Fault>,
    next: usize,
    down: bool,
}

/// A running proxy in front of `upstream`.
pub struct FaultProxy {
    port: u16,
    state: Arc<Mutex<State>>,
    injected: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            schedule: vec![Fault::Pass],
            next: 0,
            down: false,
        }));
        let injected = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, inj, stp, up) = (
            state.clone(),
            injected.clone(),
            stop.clone(),
            upstream.to_string(),
        );
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if stp.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(c) = conn else { continue };
                let (st, inj, up) = (st.clone(), inj.clone(), up.clone());
                std::thread::spawn(move || {
                    let _ = serve(c, &up, &st, &inj);
                });
            }
        });
        FaultProxy {
            port,
            state,
            injected,
            stop,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Request number i (from now) gets `faults[i % len]`.
    pub fn set_schedule(&self, faults: Vec<Fault>) {
        let mut s = self.state.lock().unwrap();
        s.schedule = faults;
        s.next = 0;
    }

    /// While down, every request is answered 503 (the store is gone).
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// How many requests got a fault other than `Pass`.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
    }
}

/// Reads a request (head and body) from `c`, or None at the end of the connection.
fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut body = Vec::new();
    if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        // Keep the chunked framing as it came.
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            body.extend_from_slice(size.as_bytes());
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            if n == 0 {
                break;
            }
        }
    }
    Ok(Some((head, body)))
}

/// `head` with its `Connection` header replaced by `Connection: close`.
fn closing(head: &str) -> String {
    let mut out: Vec<&str> = head
        .split("\r\n")
        .filter(|l| {
            !l.split_once(':')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"))
        })
        .collect();
    // `out` ends with the two empty strings of the final "\r\n\r\n".
    while out.last() == Some(&"") {
        out.pop();
    }
    format!("{}\r\nConnection: close\r\n\r\n", out.join("\r\n"))
}

fn serve(c: TcpStream, upstream: &str, st: &Mutex<State>, inj: &AtomicU64) -> std::io::Result<()> {
    let mut w = c.try_clone()?;
    let mut r = BufReader::new(c);
    let Some((head, body)) = read_request(&mut r)? else {
        return Ok(());
    };
    let fault = {
        let mut s = st.lock().unwrap();
        if s.down {
            Fault::Status(503)
        } else {
            let f = s.schedule[s.next % s.schedule.len()];
            s.next += 1;
            f
        }
    };
    if fault != Fault::Pass {
        inj.fetch_add(1, Ordering::Relaxed);
    }
    match fault {
        Fault::Drop => return w.shutdown(Shutdown::Both),
        Fault::Status(code) => {
            write!(
                w,
                "HTTP/1.1 {code} Injected Fault\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return w.shutdown(Shutdown::Both);
        }
        Fault::Stall(d) => std::thread::sleep(d),
        Fault::Pass | Fault::Truncate => {}
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(closing(&head).as_bytes())?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|x| x == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(answer.len());
    let (ahead, abody) = answer.split_at(split);
    let ahead = closing(&String::from_utf8_lossy(ahead));
    w.write_all(ahead.as_bytes())?;
    if fault == Fault::Truncate {
        w.write_all(&abody[..abody.len() / 2])?;
    } else {
        w.write_all(abody)?;
    }
    w.shutdown(Shutdown::Both)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A server answering every request with `hello` (Content-Length 5), one per connection.
    fn upstream() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let mut r = BufReader::new(c.try_clone().unwrap());
                if let Ok(Some((head, body))) = read_request(&mut r) {
                    let mut w = c;
                    let echo = if head.starts_with("PUT") {
                        body.len()
                    } else {
                        0
                    };
                    let _ = write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Put: {echo}\r\nConnection: keep-alive\r\n\r\nhello"
                    );
                }
            }
        });
        addr
    }

    /// Sends a request through the proxy; answers what came back before the connection ended.
    fn ask(p: &FaultProxy, req: &str) -> String {
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    const GET: &str = "GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n";

    #[test]
    fn the_proxy_forwards_and_injects_each_fault_of_its_schedule() {
        let p = FaultProxy::start(&upstream());
        let ok = ask(&p, GET);
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("hello"),
            "{ok}"
        );
        assert!(
            ok.contains("Connection: close") && !ok.contains("keep-alive"),
            "{ok}"
        );
        let put = ask(&p, "PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert!(
            put.contains("X-Put: 3"),
            "the body reached the server: {put}"
        );
        p.set_schedule(vec![
            Fault::Status(503),
            Fault::Drop,
            Fault::Truncate,
            Fault::Stall(Duration::from_millis(300)),
            Fault::Status(500),
        ]);
        assert!(ask(&p, GET).starts_with("HTTP/1.1 503"));
        assert_eq!(ask(&p, GET), "");
        let cut = ask(&p, GET);
        assert!(
            cut.contains("Content-Length: 5") && cut.ends_with("\r\n\r\nhe"),
            "{cut}"
        );
        let t = Instant::now();
        assert!(ask(&p, GET).ends_with("hello"));
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(ask(&p, GET).starts_with("HTTP/1.1 500"));
        assert_eq!(p.injected(), 5);
        p.set_down(true);
        assert!(ask(&p, GET).starts_with("HTTP/1.1 503"));
        p.set_down(false);
        assert!(
            ask(&p, GET).starts_with("HTTP/1.1 503"),
            "the schedule goes round"
        );
    }
}
