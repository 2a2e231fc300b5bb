#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| multilora_server_fuzz::load_with("adapter_config.json", data));
