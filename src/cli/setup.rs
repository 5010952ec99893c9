//! `nixery-local setup CLIENT`: points a container client at the daemon.

use nixery_local::ops::setup::SetupCommand;

use super::{settings, Failure};

pub fn run(client: &SetupCommand) -> Result<(), Failure> {
    let common = client.common();
    let settings = settings(common.config.clone(), common.options.clone())?;
    nixery_local::ops::setup::run(client, &settings, &mut std::io::stdout().lock())?;
    Ok(())
}
