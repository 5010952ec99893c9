//! Accounts and groups from the system's databases (getpwnam and friends):
//! who owns the cache, and whether the service's user may use the Nix
//! daemon's socket.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// A user account: name, uid, primary group and home.
#[derive(Clone, Debug)]
pub struct Account {
    pub name: CString,
    pub uid: u32,
    pub gid: u32,
    pub home: OsString,
}

/// Room for the strings getpw*_r and getgr*_r return.
const BUF: usize = 16 * 1024;

fn account_from(pwd: &libc::passwd) -> Account {
    // SAFETY: on success both fields point at NUL-terminated strings in the
    // caller's buffer, which outlives this copy.
    let (name, home) = unsafe { (CStr::from_ptr(pwd.pw_name), CStr::from_ptr(pwd.pw_dir)) };
    Account {
        name: name.to_owned(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home: OsStr::from_bytes(home.to_bytes()).to_owned(),
    }
}

/// The account of `uid`, if there is one.
pub fn by_uid(uid: u32) -> Option<Account> {
    let mut buf = vec![0u8; BUF];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then(|| account_from(&pwd))
}

/// The account called `name`, if there is one.
pub fn by_name(name: &str) -> Option<Account> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; BUF];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then(|| account_from(&pwd))
}

/// The name of group `gid`, or the number.
pub fn group_name(gid: u32) -> String {
    let mut buf = vec![0u8; BUF];
    // SAFETY: an all-zero group is a valid value to be overwritten.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return gid.to_string();
    }
    // SAFETY: on success gr_name points at a NUL-terminated string in `buf`.
    unsafe { CStr::from_ptr(grp.gr_name) }
        .to_string_lossy()
        .into_owned()
}

/// Every group `account` is in, its primary group included.
pub fn groups_of(account: &Account) -> Vec<u32> {
    let mut n: libc::c_int = 64;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; n as usize];
        let asked = n;
        // SAFETY: `groups` has room for `n` entries; getgrouplist writes at
        // most that many and sets `n` to the count it needs.
        let rc = unsafe {
            libc::getgrouplist(
                account.name.as_ptr(),
                account.gid,
                groups.as_mut_ptr(),
                &mut n,
            )
        };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if n <= asked {
            // No bigger answer is coming: give the primary group only.
            return vec![account.gid];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_uid_and_name() {
        let root = by_uid(0).expect("uid 0");
        assert_eq!(root.name.to_str(), Ok("root"));
        assert_eq!(by_name("root").map(|a| a.uid), Some(0));
        assert!(groups_of(&root).contains(&0));
        assert_eq!(group_name(0), "root");
        assert!(by_name("no-such-user-here").is_none());
    }
}
