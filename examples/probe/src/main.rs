//! The probe reports what a process sees of its sandbox: its PID, uid, capabilities,
//! no_new_privs, seccomp mode, whether / and /tmp are writable, what /tmp holds at most,
//! whether mount and unshare are refused, its environment. graven's runtime tests run it in
//! instances and, as a negative control, as a bare process.
//!
//! Std only, so it links statically and runs from an empty image; the few syscalls std has
//! no wrapper for are made directly (x86_64 and aarch64).
//!
//! `probe report` prints the report and exits. `probe serve` prints it, then answers
//! `/healthz` and `/report` on `$PORT`, exits 0 on SIGTERM (or ignores SIGTERM when
//! `PROBE_IGNORE_TERM=1`, or leaves it alone with `PROBE_DEFAULT_TERM=1`), and counts its starts in `$PROBE_VOLUME/count` when that is set.
//! `probe fill-tmp` writes to /tmp until it is full and reports how much fitted.
//! `probe lines N` prints `line 0` to `line N-1` on stdout (for log capture and rotation).
//! `probe threads N` starts threads until one is refused or N run, and reports how many ran
//! (for the process limit).
//! `probe powers` prints the report, then what a process of its uid may do: write a file in
//! each directory of `$PROBE_WRITE` (comma-separated), read each file of `$PROBE_READ`, chown
//! a file it made, open a raw socket, read /dev/stdin, open /dev/stdout and /dev/stderr for
//! writing, and last setuid to another user.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

const SIGTERM: usize = 15;
const CLONE_NEWUSER: usize = 0x1000_0000;

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const RT_SIGACTION: usize = 13;
    pub const RT_SIGPROCMASK: usize = 14;
    pub const MOUNT: usize = 165;
    pub const UNSHARE: usize = 272;
    pub const SIGNALFD4: usize = 289;
    pub const IO_URING_SETUP: usize = 425;
    pub const STATFS: usize = 137;
    pub const SOCKET: usize = 41;
    pub const SETUID: usize = 105;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const RT_SIGACTION: usize = 134;
    pub const RT_SIGPROCMASK: usize = 135;
    pub const MOUNT: usize = 40;
    pub const UNSHARE: usize = 97;
    pub const SIGNALFD4: usize = 74;
    pub const IO_URING_SETUP: usize = 425;
    pub const STATFS: usize = 43;
    pub const SOCKET: usize = 198;
    pub const SETUID: usize = 146;
}

/// A raw system call; returns the kernel's result (a negative errno on failure).
fn syscall(number: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let e = 0usize;
    let ret: isize;
    // SAFETY: the callers pass arguments that are valid for the syscall they name: plain
    // numbers or pointers to live, properly sized memory.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") number as isize => ret,
            in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d, in("r8") e,
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    // SAFETY: as above.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") number,
            inlateout("x0") a as isize => ret,
            in("x1") b, in("x2") c, in("x3") d, in("x4") e,
            options(nostack)
        );
    }
    ret
}

fn outcome(ret: isize) -> String {
    if ret >= 0 {
        "ok".to_owned()
    } else {
        std::io::Error::from_raw_os_error(-ret as i32)
            .to_string()
            .split(" (os error")
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

fn io_outcome<T>(result: std::io::Result<T>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => e
            .to_string()
            .split(" (os error")
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

fn report() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut lines = vec![
        format!("pid={}", std::process::id()),
        format!("uid={}", status_field(&status, "Uid:")),
        format!("gid={}", status_field(&status, "Gid:")),
        format!("euid={}", {
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"));
            uids.and_then(|u| u.split_whitespace().nth(1))
                .unwrap_or("?")
                .to_owned()
        }),
        open_fds(),
        format!("shm_bytes={}", fs_bytes(c"/dev/shm")),
        format!("cap_eff={}", status_field(&status, "CapEff:")),
        format!("cap_bnd={}", status_field(&status, "CapBnd:")),
        format!("no_new_privs={}", status_field(&status, "NoNewPrivs:")),
        format!("seccomp={}", status_field(&status, "Seccomp:")),
        format!("root_write={}", {
            let result = std::fs::write("/probe-was-here", b"x");
            // Run bare (the negative control), the probe must not leave litter on the host.
            let _ = std::fs::remove_file("/probe-was-here");
            io_outcome(result)
        }),
        format!("tmp_write={}", {
            let result = std::fs::write("/tmp/probe-was-here", b"x");
            let _ = std::fs::remove_file("/tmp/probe-was-here");
            io_outcome(result)
        }),
        format!(
            "timer_list_bytes={}",
            std::fs::File::open("/proc/timer_list")
                .and_then(|mut f| {
                    let mut buf = [0u8; 64];
                    f.read(&mut buf)
                })
                .map_or_else(|e| format!("error {e}"), |n| n.to_string())
        ),
        format!(
            "proc_sys_write={}",
            io_outcome(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/proc/sys/kernel/hostname")
            )
        ),
        format!(
            "hostname={}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
        ),
        // A file system type that does not exist: run bare as root this fails with "No
        // such device" and mounts nothing; in a sandbox it must be refused before that.
        format!("mount={}", {
            let (source, target, fstype) = (c"none", c"/tmp", c"graven-no-such-fs");
            outcome(syscall(
                nr::MOUNT,
                source.as_ptr() as usize,
                target.as_ptr() as usize,
                fstype.as_ptr() as usize,
                0,
            ))
        }),
        // No parameters: run bare this fails with "Bad address" and sets nothing up; in a
        // sandbox it must be refused before that.
        format!(
            "io_uring={}",
            outcome(syscall(nr::IO_URING_SETUP, 1, 0, 0, 0))
        ),
        format!("port={}", std::env::var("PORT").unwrap_or_default()),
        format!(
            "probe_env={}",
            std::env::var("PROBE_ENV").unwrap_or_default()
        ),
        format!(
            "cwd={}",
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        ),
    ];
    if let Ok(dir) = std::env::var("PROBE_VOLUME") {
        // Counted once per process, however often the report is asked for.
        static COUNT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        lines.push(format!(
            "volume_count={}",
            COUNT.get_or_init(|| count_start(&dir))
        ));
    }
    // Last, because it moves the probe into a new user namespace when it is allowed.
    lines.push(format!(
        "unshare={}",
        outcome(syscall(nr::UNSHARE, CLONE_NEWUSER, 0, 0, 0))
    ));
    lines.join("\n") + "\n"
}

/// The descriptors open in this process (but the one that lists them), as `fds=0,1,2`, and
/// what each points at as `fd_links=`.
fn open_fds() -> String {
    let own = format!("/proc/{}/fd", std::process::id());
    let mut fds: Vec<(u32, String)> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| {
                    let fd = entry.file_name().to_str()?.parse().ok()?;
                    let link = std::fs::read_link(entry.path()).ok()?;
                    let link = link.display().to_string();
                    (link != own && link != "/proc/self/fd").then_some((fd, link))
                })
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    let numbers: Vec<String> = fds.iter().map(|(fd, _)| fd.to_string()).collect();
    let links: Vec<String> = fds.iter().map(|(fd, l)| format!("{fd}:{l}")).collect();
    format!("fds={}\nfd_links={}", numbers.join(","), links.join(" "))
}

/// The size of the file system at `path` in bytes (blocks times block size), from statfs.
fn fs_bytes(path: &std::ffi::CStr) -> String {
    // struct statfs: f_type, f_bsize, f_blocks first, each 64 bits on both architectures.
    let mut buffer = [0u64; 16];
    let ret = syscall(
        nr::STATFS,
        path.as_ptr() as usize,
        buffer.as_mut_ptr() as usize,
        0,
        0,
    );
    if ret < 0 {
        return format!("error {}", outcome(ret));
    }
    (buffer[1] * buffer[2]).to_string()
}

/// `threads N`: starts parked threads until one is refused or N run; reports how many ran
/// and why it stopped.
fn threads() {
    let most: u64 = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut started = 0u64;
    let mut end = "ok".to_owned();
    while started < most {
        let spawned = std::thread::Builder::new().stack_size(64 * 1024).spawn(|| {
            loop {
                std::thread::park();
            }
        });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => {
                end = io_outcome::<()>(Err(e));
                break;
            }
        }
    }
    println!("threads={started}\nthreads_end={end}");
}

/// Increments `<dir>/count` and returns the new value (or the error).
fn count_start(dir: &str) -> String {
    let path = format!("{dir}/count");
    let previous: u64 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    match std::fs::write(&path, (previous + 1).to_string()) {
        Ok(()) => (previous + 1).to_string(),
        Err(e) => format!("error {e}"),
    }
}

/// Writes 1 MiB chunks to /tmp until it fails; reports how many bytes fitted and why it stopped.
fn fill_tmp() -> String {
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0u64;
    let result = std::fs::File::create("/tmp/fill").and_then(|mut file| {
        for _ in 0..4096 {
            file.write_all(&chunk)?;
            file.sync_all()?;
            written += chunk.len() as u64;
        }
        Ok(())
    });
    let _ = std::fs::remove_file("/tmp/fill");
    format!(
        "tmp_fill_bytes={written}\ntmp_fill_end={}\n",
        io_outcome(result)
    )
}

fn handle_sigterm() {
    if std::env::var("PROBE_DEFAULT_TERM").as_deref() == Ok("1") {
        println!("probe: leaving SIGTERM alone");
        return;
    }
    if std::env::var("PROBE_IGNORE_TERM").as_deref() == Ok("1") {
        // struct kernel_sigaction { handler, flags, restorer, mask }; SIG_IGN is 1.
        let action: [usize; 4] = [1, 0, 0, 0];
        syscall(nr::RT_SIGACTION, SIGTERM, action.as_ptr() as usize, 0, 8);
        println!("probe: ignoring SIGTERM");
        return;
    }
    // Blocked and read from a signalfd, so std needs no signal handler.
    let mask: u64 = 1 << (SIGTERM - 1);
    syscall(nr::RT_SIGPROCMASK, 0, (&raw const mask) as usize, 0, 8);
    let fd = syscall(nr::SIGNALFD4, usize::MAX, (&raw const mask) as usize, 8, 0);
    if fd < 0 {
        println!("probe: no signalfd: {}", outcome(fd));
        return;
    }
    std::thread::spawn(move || {
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` is the signalfd just created, owned by this thread from here on.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd as i32) };
        let mut info = [0u8; 128];
        if file.read_exact(&mut info).is_ok() {
            println!("probe: got SIGTERM");
            std::process::exit(0);
        }
    });
}

fn serve() {
    handle_sigterm();
    let text = report();
    print!("{text}");
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".to_owned());
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("probe: cannot listen on {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("probe: listening on {port}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(n) if n > 2 => {}
                _ => break,
            }
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/");
        let body = match path {
            "/healthz" => "ok\n".to_owned(),
            "/report" => report(),
            "/fill-tmp" => fill_tmp(),
            _ => "probe\n".to_owned(),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// `lines N`: prints `line 0` to `line N-1` on stdout, as fast as it can.
fn lines() {
    let count: u64 = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in 0..count {
        let _ = writeln!(out, "line {i}");
    }
}

/// `probe powers`: see the module's head.
fn powers() -> String {
    let mut lines = vec![report()];
    let list = |name: &str| -> Vec<String> {
        std::env::var(name)
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    };
    for dir in list("PROBE_WRITE") {
        let file = format!("{dir}/probe-wrote");
        let result = std::fs::write(&file, b"x");
        lines.push(format!("write:{dir}={}\n", io_outcome(result)));
    }
    for file in list("PROBE_READ") {
        let result = std::fs::read(&file);
        lines.push(format!("read:{file}={}\n", io_outcome(result)));
    }
    let mine = "/tmp/probe-chown";
    let _ = std::fs::write(mine, b"x");
    let chown = std::os::unix::fs::chown(mine, Some(1), Some(1));
    lines.push(format!("chown={}\n", io_outcome(chown)));
    // AF_INET, SOCK_RAW, IPPROTO_ICMP: what ping needs CAP_NET_RAW for.
    lines.push(format!(
        "raw_socket={}\n",
        outcome(syscall(nr::SOCKET, 2, 3, 1, 0))
    ));
    let stdin = std::fs::File::open("/dev/stdin").and_then(|mut f| f.read(&mut [0u8; 1]));
    lines.push(format!("dev_stdin={}\n", io_outcome(stdin)));
    // Opened for appending, as servers open a log (nginx's `error_log /dev/stderr`), and once
    // plainly, as `echo x > /dev/stdout` does (which graven's append-only log files refuse
    // as root: docs/logs.md, "Protection").
    for stream in ["stdout", "stderr"] {
        let opened = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("/dev/{stream}"))
            .and_then(|mut f| f.write_all(format!("probe wrote to /dev/{stream}\n").as_bytes()));
        lines.push(format!("dev_{stream}={}\n", io_outcome(opened)));
    }
    let plain = std::fs::OpenOptions::new().write(true).open("/dev/stdout");
    lines.push(format!(
        "dev_stdout_plain={}\n",
        io_outcome(plain.map(drop))
    ));
    // Last: when it is allowed, the probe is another user from here on.
    lines.push(format!(
        "setuid={}\n",
        outcome(syscall(nr::SETUID, 1, 0, 0, 0))
    ));
    lines.concat()
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("report") => print!("{}", report()),
        Some("powers") => print!("{}", powers()),
        Some("fill-tmp") => print!("{}", fill_tmp()),
        Some("lines") => lines(),
        Some("threads") => threads(),
        Some("serve") | None => serve(),
        Some(other) => {
            eprintln!(
                "probe: unknown mode {other:?} (report, serve, fill-tmp, lines N, threads N)"
            );
            std::process::exit(2);
        }
    }
}
