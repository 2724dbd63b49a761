pub fn run(_: DemoArgs) -> anyhow::Result<()> {
    Ok(())
}
#[derive(clap::Args)]
pub struct DemoArgs {}
