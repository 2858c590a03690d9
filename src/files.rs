//! File access as people and the service meet it: who owns a file and with what mode, whether
//! a given user can read it, and what to tell someone who cannot. Used where a file is opened
//! on a person's behalf (`check`, `status`, `queue stats`) and to warn when the service's own
//! user could not read a file its config names (a password or TLS key left `0600 root`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The user the packaged service runs as (`FIELDGATE_SERVICE_USER` to check for another).
pub fn service_user_name() -> String {
    std::env::var("FIELDGATE_SERVICE_USER").unwrap_or_else(|_| "fieldgate".into())
}

/// A user as far as reading files goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
}

/// Owner, group and permission bits of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Access {
    pub fn of(path: &Path) -> std::io::Result<Access> {
        let m = std::fs::metadata(path)?;
        Ok(Access {
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode() & 0o7777,
        })
    }

    /// Whether `user` may do what `bits` (4 read, 1 search) asks; root may read anything.
    pub fn allows(&self, user: &User, bits: u32) -> bool {
        if user.uid == 0 {
            return true;
        }
        let granted = if user.uid == self.uid {
            self.mode >> 6
        } else if user.groups.contains(&self.gid) {
            self.mode >> 3
        } else {
            self.mode
        };
        granted & bits == bits
    }

    /// `owner root:fieldgate, mode 0640`.
    pub fn describe(&self) -> String {
        format!(
            "owner {}:{}, mode {:04o}",
            name_of("/etc/passwd", self.uid).unwrap_or_else(|| self.uid.to_string()),
            name_of("/etc/group", self.gid).unwrap_or_else(|| self.gid.to_string()),
            self.mode
        )
    }
}

/// Looks a user up in /etc/passwd and /etc/group; None when there is no such user.
pub fn user(name: &str) -> Option<User> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let (uid, gid) = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| (f[2].parse().ok(), f[3].parse().ok()))
    })?;
    let (uid, gid): (u32, u32) = (uid?, gid?);
    let mut groups = vec![gid];
    if let Ok(group) = std::fs::read_to_string("/etc/group") {
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3
                && f[3].split(',').any(|m| m == name)
                && let Ok(g) = f[2].parse()
            {
                groups.push(g);
            }
        }
    }
    Some(User {
        name: name.to_string(),
        uid,
        groups,
    })
}

/// Why `user` cannot read `path` (the file, or a folder on the way), or None when it can (or
/// when that cannot be told: a file that does not exist is someone else's error).
pub fn unreadable_by(path: &Path, user: &User) -> Option<String> {
    let path = std::path::absolute(path).ok()?;
    let access = Access::of(&path).ok()?;
    for dir in path.ancestors().skip(1) {
        if let Ok(a) = Access::of(dir)
            && !a.allows(user, 1)
        {
            return Some(format!(
                "the folder {} ({}) cannot be entered by user {}",
                dir.display(),
                a.describe(),
                user.name
            ));
        }
    }
    (!access.allows(user, 4)).then(|| {
        format!(
            "{} ({}) is not readable by user {}, which the service runs as: `sudo chown root:{} {} && sudo chmod 0640 {}`",
            path.display(),
            access.describe(),
            user.name,
            user.name,
            path.display(),
            path.display()
        )
    })
}

/// What to tell a person whose attempt to read `path` was refused: the file's owner and mode,
/// or those of the folder on the way that keeps them out, and what to do.
pub fn permission_hint(path: &Path) -> String {
    // The deepest part of the path this user can still look at is what refuses the rest.
    let Some((at, access)) = path
        .ancestors()
        .find_map(|p| Access::of(p).ok().map(|a| (p, a)))
    else {
        return "permission denied: run it with sudo".into();
    };
    let what = if at == path {
        access.describe()
    } else {
        format!("{}: {}", at.display(), access.describe())
    };
    let group_reads = access.mode & 0o050 != 0;
    match name_of("/etc/group", access.gid) {
        Some(g) if group_reads && g != "root" => format!(
            "permission denied ({what}): run it with sudo, or join the group: `sudo usermod -aG {g} $USER`, then log in again"
        ),
        _ => format!("permission denied ({what}): run it with sudo"),
    }
}

/// The name of `id` in a passwd or group file.
fn name_of(file: &str, id: u32) -> Option<String> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse::<u32>().ok() == Some(id)).then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32, groups: &[u32]) -> User {
        User {
            name: "fieldgate".into(),
            uid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn owner_group_and_others_bits_decide_in_that_order() {
        let f = Access {
            uid: 0,
            gid: 998,
            mode: 0o640,
        };
        assert!(f.allows(&user(999, &[998]), 4), "group member reads 0640");
        assert!(!f.allows(&user(999, &[1000]), 4), "others do not");
        assert!(f.allows(&user(0, &[]), 4), "root reads anything");
        let secret = Access {
            uid: 0,
            gid: 0,
            mode: 0o600,
        };
        assert!(
            !secret.allows(&user(999, &[998]), 4),
            "0600 root is root's alone"
        );
        let own = Access {
            uid: 999,
            gid: 999,
            mode: 0o400,
        };
        assert!(own.allows(&user(999, &[999]), 4));
        // The owner's bits apply to the owner even when the group's would allow more.
        let odd = Access {
            uid: 999,
            gid: 998,
            mode: 0o040,
        };
        assert!(!odd.allows(&user(999, &[998]), 4));
    }
}
