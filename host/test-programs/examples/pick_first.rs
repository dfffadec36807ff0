//! Well behaved: always picks endpoint 0; `configure("fail")` errors.
struct First;

impl kwp_test_programs::Pick for First {
    fn pick(_service: u32, endpoints: usize, _port: u16) -> Option<u32> {
        kwp_test_programs::first(endpoints)
    }
    fn configure(config: &str) -> Result<(), String> {
        if config == "fail" {
            Err("configured to fail".into())
        } else {
            Ok(())
        }
    }
}

kwp_sdk::export_policy!(kwp_test_programs::With<First>);
