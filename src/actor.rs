//! Who ran a command, as the event log records it: `user@host`. The daemon takes the user
//! from the kernel's credentials of the socket's peer (`SO_PEERCRED`), not from anything the
//! client says, and the host is the daemon's own; `graven up`, which runs the control plane
//! in its own process, records the user that runs it. Names no other module.

/// The actor of a peer whose credentials could not be read.
pub const UNKNOWN: &str = "unknown";

/// `user@host` for a numeric user id: the name from the host's passwd database, or
/// `uid-N` when it has none.
pub fn of_uid(uid: u32) -> String {
    let user = user_name(uid).unwrap_or_else(|| format!("uid-{uid}"));
    format!("{user}@{}", host())
}

/// The actor of this process: the user it runs as, on this host.
pub fn this_process() -> String {
    of_uid(rustix::process::getuid().as_raw())
}

/// This host's name, as `uname` says it.
pub fn host() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    // An actor may not hold '|' or control characters (the log's checksum joins on '|').
    name.chars()
        .filter(|c| *c != '|' && !c.is_control())
        .collect::<String>()
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty() && !name.contains('|') && !name.contains('@'))
            .then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_named_from_passwd_and_unknown_ids_by_number() {
        assert!(of_uid(0).starts_with("root@"), "{}", of_uid(0));
        assert!(
            of_uid(4_000_000_000).starts_with("uid-4000000000@"),
            "{}",
            of_uid(4_000_000_000)
        );
    }
}
