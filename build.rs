fn main() {
    // Only the Node-API binding needs napi's link setup; the core tests build without it.
    if std::env::var_os("CARGO_FEATURE_NODE").is_some() {
        napi_build::setup();
    }
}
