//! Resolving an image's USER (or `--user`) to numeric ids, from the image's own
//! /etc/passwd and /etc/group. Pure: the file contents are passed in.

/// The unprivileged identity instances run as when the image says root or nothing.
pub const NOBODY: (u32, u32) = (65534, 65534);

/// Resolves `user` (`uid[:gid]` or `name[:group]`, numbers or names) against the image's
/// passwd and group files. `None` when a name does not exist. An empty user is `NOBODY`.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Option<(u32, u32)> {
    let user = user.trim();
    if user.is_empty() {
        return Some(NOBODY);
    }
    let (name, group_name) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    let (uid, primary_gid) = match name.parse::<u32>() {
        Ok(uid) => (
            uid,
            lookup_passwd(passwd, |n, id| id == uid || n == name).map(|(_, g)| g),
        ),
        Err(_) => {
            let (uid, gid) = lookup_passwd(passwd, |n, _| n == name)?;
            (uid, Some(gid))
        }
    };
    let gid = match group_name {
        Some(group_name) => match group_name.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup_group(group, group_name)?,
        },
        None => primary_gid.unwrap_or(uid),
    };
    Some((uid, gid))
}

/// The identity to run as: an image that says root (or nothing) gets `NOBODY`; an explicit
/// `--user` is honoured even when it is root (it still has no capabilities).
pub fn choose(
    explicit: Option<&str>,
    image: Option<&str>,
    passwd: &str,
    group: &str,
) -> Option<(u32, u32)> {
    match explicit {
        Some(user) => resolve(user, passwd, group),
        None => {
            let resolved = resolve(image.unwrap_or(""), passwd, group)?;
            Some(if resolved.0 == 0 { NOBODY } else { resolved })
        }
    }
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

    fn check(explicit: Option<&str>, image: Option<&str>, expected: Option<(u32, u32)>) {
        assert_eq!(
            choose(explicit, image, PASSWD, GROUP),
            expected,
            "{explicit:?} {image:?}"
        );
    }

    #[test]
    fn users() {
        check(None, None, Some(NOBODY));
        check(None, Some(""), Some(NOBODY));
        check(None, Some("root"), Some(NOBODY));
        check(None, Some("0:0"), Some(NOBODY));
        check(None, Some("app"), Some((1000, 1001)));
        check(None, Some("1000"), Some((1000, 1001)));
        check(None, Some("1234"), Some((1234, 1234)));
        check(None, Some("app:staff"), Some((1000, 50)));
        check(None, Some("65534:65534"), Some(NOBODY));
        check(None, Some("ghost"), None);
        check(None, Some("app:ghosts"), None);
        check(Some("0"), Some("app"), Some((0, 0)));
        check(Some("app:7"), None, Some((1000, 7)));
    }
}
