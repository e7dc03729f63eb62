//! How a bench includes the shared modules: `common_modules!("common"; args, net, ...)` declares
//! `mod common` with the named files of this directory (the literal is this directory's path
//! from the bench's own file), plus `common::process`, the process guards shared with the e2e
//! tests (`tests/support/process.rs`). A bench names only the modules it uses, so code it does
//! not use still draws a dead-code warning.

macro_rules! common_modules {
    ($dir:literal; $($module:ident),* $(,)?) => {
        /// The shared bench modules this bench uses (benches/common/).
        #[path = $dir]
        mod common {
            #[path = "../../tests/support/process.rs"]
            #[allow(dead_code, reason = "shared with the e2e tests; a bench uses part of it")]
            pub mod process;
            $(pub mod $module;)*
        }
    };
}
