//! The NBD client against a fake server that answers with random or damaged bytes, during the
//! handshake and after it: every answer yields a value or an error, never a panic, a hang or
//! an allocation beyond the client's bounds.
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use ferry_nbd::NbdClient;
use proptest::prelude::*;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

fn option_reply(s: &mut UnixStream, opt: u32, ty: u32, data: &[u8]) {
    let mut m = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&ty.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    let _ = s.write_all(&m);
}

/// A correct fixed-newstyle handshake (structured replies, one meta context, a 1 MiB export),
/// as far as the client lets it get.
fn handshake(s: &mut UnixStream) -> Option<()> {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&hello).ok()?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags).ok()?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).ok()?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).ok()?;
        match opt {
            8 => option_reply(s, opt, 1, &[]),
            10 => {
                let mut ctx = 1u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(b"base:allocation");
                option_reply(s, opt, 4, &ctx);
                option_reply(s, opt, 1, &[]);
            }
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&0u16.to_be_bytes());
                option_reply(s, opt, 3, &info);
                option_reply(s, opt, 1, &[]);
                return Some(());
            }
            _ => return None,
        }
    }
}

/// Serves one client on a fresh socket: `script` writes what the server answers; the
/// connection closes after it.
fn serve(
    script: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::thread::JoinHandle<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            script(&mut s);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    });
    (dir, path, t)
}

/// A reply to the request the client sends: random bytes, or a well-framed simple or
/// structured reply (right cookie) with random fields and payload.
#[derive(Debug, Clone)]
enum Reply {
    Raw(Vec<u8>),
    Simple {
        error: u32,
        data: Vec<u8>,
    },
    Structured {
        flags: u16,
        ty: u16,
        len: u32,
        payload: Vec<u8>,
    },
}

fn reply_strategy() -> impl Strategy<Value = Reply> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Reply::Raw),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(error, data)| Reply::Simple { error, data }),
        (
            any::<u16>(),
            prop_oneof![
                Just(0u16),
                Just(1),
                Just(2),
                Just(5),
                Just(1 << 15 | 1),
                Just(1 << 15 | 2),
                any::<u16>()
            ],
            prop_oneof![0u32..64, any::<u32>()],
            proptest::collection::vec(any::<u8>(), 0..96),
        )
            .prop_map(|(flags, ty, len, payload)| Reply::Structured {
                flags,
                ty,
                len,
                payload
            }),
    ]
}

fn answer(s: &mut UnixStream, r: &Reply) {
    let mut req = [0u8; 28];
    if s.read_exact(&mut req).is_err() {
        return;
    }
    let cookie = &req[8..16];
    let mut out = Vec::new();
    match r {
        Reply::Raw(b) => out.extend_from_slice(b),
        Reply::Simple { error, data } => {
            out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&error.to_be_bytes());
            out.extend_from_slice(cookie);
            out.extend_from_slice(data);
        }
        Reply::Structured {
            flags,
            ty,
            len,
            payload,
        } => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&ty.to_be_bytes());
            out.extend_from_slice(cookie);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(payload);
        }
    }
    let _ = s.write_all(&out);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn a_damaged_handshake_is_an_error(tail in proptest::collection::vec(any::<u8>(), 0..96), prefix in 0usize..3) {
        let (_d, path, t) = serve(move |s| {
            let mut b = Vec::new();
            if prefix > 0 {
                b.extend_from_slice(&NBDMAGIC.to_be_bytes());
            }
            if prefix > 1 {
                b.extend_from_slice(&IHAVEOPT.to_be_bytes());
                b.extend_from_slice(&3u16.to_be_bytes());
            }
            b.extend_from_slice(&tail);
            let _ = s.write_all(&b);
        });
        let r = NbdClient::connect_unix_timeout(&path, "x", &["base:allocation"], Duration::from_secs(5));
        prop_assert!(r.is_err());
        t.join().unwrap();
    }

    #[test]
    fn a_damaged_read_reply_is_a_value_or_an_error(reply in reply_strategy()) {
        let r2 = reply.clone();
        let (_d, path, t) = serve(move |s| {
            if handshake(s).is_some() {
                answer(s, &r2);
            }
        });
        let mut c = NbdClient::connect_unix_timeout(&path, "x", &["base:allocation"], Duration::from_secs(5)).unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = c.read_at(0, &mut buf);
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn a_damaged_block_status_reply_is_a_value_or_an_error(reply in reply_strategy()) {
        let r2 = reply.clone();
        let (_d, path, t) = serve(move |s| {
            if handshake(s).is_some() {
                answer(s, &r2);
            }
        });
        let mut c = NbdClient::connect_unix_timeout(&path, "x", &["base:allocation"], Duration::from_secs(5)).unwrap();
        if let Ok(ext) = c.block_status("base:allocation", 0, 65536) {
            prop_assert!(ext.iter().all(|e| e.offset < 1 << 20));
        }
        drop(c);
        t.join().unwrap();
    }
}
