//! The job parser must never panic, whatever a queue delivers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reset_worker::job::ResetJob;

fuzz_target!(|data: &[u8]| {
    // SQS bodies are text; the lossy conversion also exercises U+FFFD.
    let body = String::from_utf8_lossy(data);
    if let Ok(job) = ResetJob::parse(&body) {
        // Whatever is accepted obeys the documented rules.
        let username = job.username.expose();
        assert!(!username.trim().is_empty());
        assert!(username.chars().count() <= 128);
        assert!(!username.chars().any(char::is_control));
    }
});
