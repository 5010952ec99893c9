//! `nixery-local doctor`: checks what a working setup needs and says what
//! is wrong, one line a check.

use nixery_local::ops::doctor::{ClientPaths, Verdict};

use super::{Common, Failure};

#[derive(clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    paths: ClientPaths,
}

pub fn run(args: DoctorArgs) -> Result<(), Failure> {
    let settings = args.common.system_settings()?;
    let checks = nixery_local::ops::doctor::run(&settings, &args.paths);
    let mut failed = false;
    for c in &checks {
        let mark = match c.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Note => "note",
            Verdict::Fail => {
                failed = true;
                "FAIL"
            }
        };
        println!("{mark}  {:<15} {}", c.what, c.detail);
    }
    if failed {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}
