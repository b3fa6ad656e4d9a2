//! graven's example service.
//!
//! A deliberately small HTTP/1.1 server on std alone, so it links statically and runs from a
//! `FROM scratch` image. It answers `/` with a greeting naming its version, `/healthz` with
//! `ok`, and listens on `$PORT` (default 8080). `$GREETING` and `$VERSION` change what `/`
//! says, which is how tests and demos make a "new release" without recompiling.
//! `$HEALTHY=0` makes `/healthz` fail: a bad release on purpose. `$REUSE_PORT=1` sets
//! SO_REUSEPORT, so several instances on one host network share a port (the Swarm half of
//! `bench/deploy.sh`, where the kernel spreads connections over the replicas).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static STOPPING: AtomicBool = AtomicBool::new(false);

struct Config {
    greeting: String,
    version: String,
    healthy: bool,
}

fn main() {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".to_owned());
    // Every address unless told otherwise: in a network of its own, an instance is reached
    // at its own address, never at the host's loopback.
    let host = std::env::var("HOST").unwrap_or_else(|_| "0.0.0.0".to_owned());
    let config: &'static Config = Box::leak(Box::new(Config {
        greeting: std::env::var("GREETING").unwrap_or_else(|_| "hello".to_owned()),
        version: std::env::var("VERSION").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_owned()),
        healthy: std::env::var("HEALTHY").map(|v| v != "0").unwrap_or(true),
    }));
    let reuse_port = std::env::var("REUSE_PORT").is_ok_and(|v| v == "1");
    let bound = if reuse_port {
        bind_reusing_port(&host, &port)
    } else {
        TcpListener::bind(format!("{host}:{port}"))
    };
    let listener = match bound {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("hello: cannot listen on {host}:{port}: {error}");
            std::process::exit(1);
        }
    };
    println!("hello {} listening on {host}:{port}", config.version);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || serve(stream, config));
    }
}

/// A listener with SO_REUSEPORT set before bind (std has no way to set it).
fn bind_reusing_port(host: &str, port: &str) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    let invalid = |what| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    let ip: std::net::Ipv4Addr = host.parse().map_err(|_| invalid("HOST must be IPv4"))?;
    let port: u16 = port.parse().map_err(|_| invalid("PORT must be a port"))?;
    let check = |result: libc::c_int| {
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(result)
        }
    };
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh socket nothing else owns; the listener closes it on drop.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for option in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        // SAFETY: a valid socket, and a pointer to an int that lives across the call.
        check(unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: address is a properly initialised sockaddr_in and its exact size is passed.
    check(unsafe {
        libc::bind(
            fd,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    // SAFETY: a bound socket; 1024 is the backlog.
    check(unsafe { libc::listen(fd, 1024) })?;
    Ok(listener)
}

/// Serves one keep-alive connection until the client closes it.
fn serve(stream: TcpStream, config: &Config) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut content_length = 0usize;
        let mut close = false;
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("connection")
                    && value.eq_ignore_ascii_case("close")
                {
                    close = true;
                }
            }
        }
        if content_length > 0 {
            let mut body = vec![0; content_length];
            if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
                return;
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let (status, body) = match path {
            "/healthz" if config.healthy && !STOPPING.load(Ordering::Relaxed) => {
                ("200 OK", "ok\n".to_owned())
            }
            "/healthz" => ("503 Service Unavailable", "unhealthy\n".to_owned()),
            "/" => (
                "200 OK",
                format!("{} from hello {}\n", config.greeting, config.version),
            ),
            _ => ("404 Not Found", "not found\n".to_owned()),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-hello-version: {}\r\n{}\r\n{body}",
            body.len(),
            config.version,
            if close { "connection: close\r\n" } else { "" },
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}
