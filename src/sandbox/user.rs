//! Resolving a USER (`uid[:gid]` or `name[:group]`) to the numeric ids a sandbox runs as,
//! from the image's own /etc/passwd and /etc/group, for bake's RUN and `--chown` and for the
//! local runtime's instances alike. Pure: the file contents are passed in.

/// A name the image's passwd or group file does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?} is not in the image's /etc/{file}")]
pub struct UnknownName {
    pub kind: &'static str,
    pub file: &'static str,
    pub name: String,
}

/// Resolves `user` against the image's passwd and group files. An empty user is root, as
/// in Docker; `root` needs no passwd entry (scratch images have none). A numeric uid takes
/// its primary group from passwd when listed there, else the same number.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<(u32, u32), UnknownName> {
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
                lookup_passwd(passwd, |n, _| n == name).ok_or_else(|| UnknownName {
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
                    return Err(UnknownName {
                        kind: "group",
                        file: "group",
                        name: group_name.to_owned(),
                    });
                }
            },
        },
        None => primary_gid.unwrap_or(uid),
    };
    Ok((uid, gid))
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
}
