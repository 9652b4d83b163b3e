//! `mesh-agent`: see `mesh_agent::cli`.

/// Counts allocations for the agent's `mesh_memory_*` metrics.
#[global_allocator]
static ALLOCATOR: mesh_agent::telemetry::runtime::CountingAllocator = mesh_agent::telemetry::runtime::CountingAllocator;

fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}
