// swift-tools-version:5.10
// Never compiled: written without Xcode (see ios_demo/README.md).
//
// The shared code of the iOS demo app and its XCTest benchmark harness. Core ML needs nothing
// beyond the SDK; ExecuTorch (.pte bundles) comes from its SwiftPM branch, the tokenizer from
// swift-transformers' `Tokenizers`. iOS 18 / macOS 15: the Core ML KV cache is an `MLState`.
import PackageDescription

/// ExecuTorch's products a mobile-export .pte needs: the runtime, the XNNPACK and Core ML
/// delegates, the LLM custom ops (`llama::update_cache`, `llama::custom_sdpa`), and the
/// optimized and quantized kernels. Kernels register at load time, hence `-all_load` below.
let executorch: [Target.Dependency] = [
    "executorch", "backend_xnnpack", "backend_coreml", "kernels_llm", "kernels_optimized", "kernels_quantized",
].map { .product(name: $0, package: "executorch") }

let package = Package(
    name: "MobileExportDemo",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "MobileExportDemo", targets: ["MobileExportDemo"]),
    ],
    dependencies: [
        // ExecuTorch 1.5.x, as the host side of mobile-export pins (executorch==1.5.1).
        .package(url: "https://github.com/pytorch/executorch", branch: "swiftpm-1.5.1"),
        .package(url: "https://github.com/huggingface/swift-transformers", from: "1.0.0"),
    ],
    targets: [
        .target(
            name: "MobileExportDemo",
            dependencies: executorch + [.product(name: "Tokenizers", package: "swift-transformers")]
        ),
        .testTarget(
            name: "MobileExportBenchmarkTests",
            dependencies: ["MobileExportDemo"],
            linkerSettings: [.unsafeFlags(["-Xlinker", "-all_load"])]
        ),
    ]
)
