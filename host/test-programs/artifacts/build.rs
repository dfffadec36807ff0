use kwp_wasm_build::{Guest, build, write_table};

fn main() {
    let built = build(&[Guest::Examples("kwp-test-programs")]);
    write_table(
        "programs.rs",
        &built,
        &[
            "pick_first",
            "pick_loops",
            "memory_bomb",
            "pick_panics",
            "sandbox_probe",
            "traps_after_probe",
            "traps_on_many_endpoints",
            "wrong_wit_version",
            "missing_export",
            "foreign_table",
            "oversized_plan",
            "plan_loops",
            "render_loops",
            "mode_breaks_after_probe",
        ],
    );
}
