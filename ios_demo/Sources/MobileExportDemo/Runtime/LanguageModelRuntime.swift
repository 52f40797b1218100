// Never compiled: written without Xcode (see ios_demo/README.md).
import Foundation

/// An opened artifact with one KV cache, fed tokens at positions like an LLM runner: the
/// project's runtime interface (`mobile_export/runtimes/base.py`, `harness/src/runtime.hpp`).
public protocol LanguageModelRuntime: AnyObject {
    /// The context the artifact was built for (the manifest's `context_length`).
    var maxSeqLen: Int { get }
    /// The vocabulary size, once loaded, where the artifact states it.
    var vocabSize: Int? { get }
    /// `{"name", "version"}` for results files.
    var runtimeInfo: [String: String] { get }
    /// Load the program (the harness times this as `load_s`).
    func load() throws
    /// Feed `tokens` at `startPos` (0 starts a new sequence); the last token's logits [vocab].
    func step(tokens: [Int32], startPos: Int) throws -> [Float]
}

extension LanguageModelRuntime {
    /// Refuse what a native runtime would crash on: no tokens, past the context, unknown ids.
    func checkStep(_ tokens: [Int32], _ startPos: Int) throws {
        guard !tokens.isEmpty, startPos >= 0 else { throw MobileExportError("a step needs at least one token") }
        guard startPos + tokens.count <= maxSeqLen else {
            throw MobileExportError("sequence of \(startPos + tokens.count) tokens exceeds the context of \(maxSeqLen)")
        }
        if let vocabSize, let bad = tokens.first(where: { $0 < 0 || Int($0) >= vocabSize }) {
            throw MobileExportError("token id \(bad) is outside the vocabulary of \(vocabSize)")
        }
    }
}

/// Picks the runtime by the manifest's `artifact.format`.
public enum RuntimeFactory {
    public static func make(for bundle: BundleManifest) throws -> LanguageModelRuntime {
        switch bundle.artifactFormat {
        case CoreMLRuntime.format:
            return try CoreMLRuntime(bundle: bundle)
        case "executorch-pte":
            #if canImport(ExecuTorch)
            return ExecuTorchRuntime(bundle: bundle)
            #else
            throw MobileExportError("this build has no ExecuTorch: add its Swift package for .pte bundles")
            #endif
        default:
            throw MobileExportError("artifact format '\(bundle.artifactFormat)' (backend \(bundle.backend)) has no runtime in this app")
        }
    }
}
