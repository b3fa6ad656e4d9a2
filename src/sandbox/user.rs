//! Resolving a USER (`uid[:gid]` or `name[:group]`) to the numeric ids a sandbox runs as,
//! from the image's own /etc/passwd and /etc/group, for bake's RUN and `--chown` and for the
//! local runtime's instances alike, and checking that an id can be run as (`check_id`, also
//! for `sandbox::identity`). Pure: the file contents are passed in.

/// Why a USER cannot be run as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// A name the image's passwd or group file does not hold.
    #[error("{kind} {name:?} is not in the image's /etc/{file}")]
    UnknownName {
        kind: &'static str,
        file: &'static str,
        name: String,
    },
    /// An id no process can run as: 4294967295 is -1, which setresuid and setresgid (and
    /// chown) read as "leave it unchanged", so a workload asking for it would keep root.
    #[error("{kind} {id} is not a valid id (it means \"unchanged\" to the kernel)")]
    InvalidId { kind: &'static str, id: u32 },
}

/// The one id that is never valid, `(uid_t) -1`.
const UNCHANGED: u32 = u32::MAX;

/// Refuses an id that setresuid, setresgid or chown would not set (`kind`: "uid" or "gid").
pub fn check_id(kind: &'static str, id: u32) -> Result<u32, UserError> {
    if id == UNCHANGED {
        Err(UserError::InvalidId { kind, id })
    } else {
        Ok(id)
    }
}

/// Resolves `user` against the image's passwd and group files. An empty user is root, as
/// in Docker; `root` needs no passwd entry (scratch images have none). A numeric uid takes
/// its primary group from passwd when listed there, else the same number. Every id, asked
/// for or read from the image's files, passes `check_id`.
/// The home directory a process of `uid` gets as `$HOME`, as Docker's builder gives it: the
/// one the image's passwd names for it, else `/root` for root and `/` for anyone else.
pub fn home_of(uid: u32, passwd: &str) -> String {
    passwd
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let id: u32 = fields.get(2)?.parse().ok()?;
            let home = fields.get(5)?;
            (id == uid && home.starts_with('/')).then(|| (*home).to_owned())
        })
        .unwrap_or_else(|| if uid == 0 { "/root" } else { "/" }.to_owned())
}

pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<(u32, u32), UserError> {
    let user = user.trim();
    let (name, group_name) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    let (uid, primary_gid) = match name.parse::<u32>() {
        Ok(uid) => (
            uid,
            lookup_passwd(passwd, |_, id| id == uid).map(|(_, g)| g),
        ),
        Err(_) if name.is_empty() || name == "root" => (
            0,
            Some(lookup_passwd(passwd, |n, _| n == "root").map_or(0, |(_, g)| g)),
        ),
        Err(_) => {
            let (uid, gid) =
                lookup_passwd(passwd, |n, _| n == name).ok_or_else(|| UserError::UnknownName {
                    kind: "user",
                    file: "passwd",
                    name: name.to_owned(),
                })?;
            (uid, Some(gid))
        }
    };
    let gid = match group_name {
        Some(group_name) => match group_name.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => match lookup_group(group, group_name) {
                Some(gid) => gid,
                None if group_name == "root" => 0,
                None => {
                    return Err(UserError::UnknownName {
                        kind: "group",
                        file: "group",
                        name: group_name.to_owned(),
                    });
                }
            },
        },
        None => primary_gid.unwrap_or(uid),
    };
    Ok((check_id("uid", uid)?, check_id("gid", gid)?))
}

fn lookup_passwd(passwd: &str, matches: impl Fn(&str, u32) -> bool) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let uid = fields.get(2)?.parse().ok()?;
        let gid = fields.get(3)?.parse().ok()?;
        matches(fields[0], uid).then_some((uid, gid))
    })
}

fn lookup_group(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name)).then(|| fields.get(2)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\napp:x:1001:\n";

    fn check(user: &str, passwd: &str, expected: Result<(u32, u32), &str>) {
        let got = resolve(user, passwd, GROUP).map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_owned), "{user:?}");
    }

    #[test]
    fn users() {
        check("", PASSWD, Ok((0, 0)));
        check("root", "", Ok((0, 0)));
        check("0", PASSWD, Ok((0, 0)));
        check("app", PASSWD, Ok((1000, 1001)));
        check("1000", PASSWD, Ok((1000, 1001)));
        check("1234", PASSWD, Ok((1234, 1234)));
        check("65534:65534", "", Ok((65534, 65534)));
        check("app:staff", PASSWD, Ok((1000, 50)));
        check("app:7", PASSWD, Ok((1000, 7)));
        check(
            "ghost",
            PASSWD,
            Err("user \"ghost\" is not in the image's /etc/passwd"),
        );
        check(
            "app:wheel",
            PASSWD,
            Err("group \"wheel\" is not in the image's /etc/group"),
        );
    }

    #[test]
    fn uid_or_gid_minus_one_is_refused_wherever_it_comes_from() {
        let unchanged_uid =
            Err("uid 4294967295 is not a valid id (it means \"unchanged\" to the kernel)");
        let unchanged_gid =
            Err("gid 4294967295 is not a valid id (it means \"unchanged\" to the kernel)");
        check("4294967295", PASSWD, unchanged_uid);
        check("4294967295:0", PASSWD, unchanged_uid);
        check("0:4294967295", PASSWD, unchanged_gid);
        check("app:4294967295", PASSWD, unchanged_gid);
        // From the image's own files, too.
        let passwd = "evil:x:4294967295:0::/:/bin/sh\nodd:x:7:4294967295::/:/bin/sh\n";
        check("evil", passwd, unchanged_uid);
        check("odd", passwd, unchanged_gid);
        // The largest id that is valid.
        check("4294967294:4294967294", "", Ok((4294967294, 4294967294)));
    }

    #[test]
    fn home_is_the_passwd_entrys_else_root_or_slash() {
        let passwd =
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nodd:x:7:7:::\n";
        assert_eq!(home_of(0, passwd), "/root");
        assert_eq!(home_of(1000, passwd), "/home/app");
        assert_eq!(home_of(7, passwd), "/");
        assert_eq!(home_of(0, ""), "/root");
        assert_eq!(home_of(4242, passwd), "/");
    }
}
