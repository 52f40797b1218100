// Never compiled: written without Xcode (see ios_demo/README.md).
#if canImport(ExecuTorch)
import ExecuTorch
import Foundation

/// A mobile-export `.pte` (`executorch-pte`) on ExecuTorch's Swift `Module` API (ExecuTorch 1.5.x,
/// `extension/apple/ExecuTorch/Exported/ExecuTorch+Module.swift`): `forward(tokens [1, T] int64,
/// input_pos [1] int64) -> logits`. The KV cache lives in the program; a step at `startPos`
/// overwrites it from there and masks what lies beyond, so a new sequence needs no reset.
/// (ExecuTorchLLM's `TextRunner` generates text from a prompt string; the harness needs the
/// logits of given tokens, so it drives the program itself, as the native C++ harness does.)
public final class ExecuTorchRuntime: LanguageModelRuntime {
    public static let format = "executorch-pte"

    public let maxSeqLen: Int
    public private(set) var vocabSize: Int?
    public var runtimeInfo: [String: String] { ["name": "executorch", "version": "1.5.1"] }  // the SwiftPM branch in Package.swift

    private let module: Module

    public init(bundle: BundleManifest) {
        maxSeqLen = bundle.contextLength
        module = Module(filePath: bundle.artifactURL.path)
    }

    public func load() throws {
        try module.load("forward")
        // A constant method mobile-export writes into every .pte; nil when absent.
        let values: [Value]? = try? module.execute("get_vocab_size", [])
        vocabSize = values?.first?.scalar?.intValue
    }

    public func step(tokens: [Int32], startPos: Int) throws -> [Float] {
        try checkStep(tokens, startPos)
        let ids = Tensor<Int64>(tokens.map { Int64($0) }, shape: [1, tokens.count])
        let position = Tensor<Int64>([Int64(startPos)], shape: [1])
        let outputs: [Value] = try module.forward([ids, position])
        guard let logits = outputs.first?.anyTensor else {
            throw MobileExportError("the program's forward returned no tensor")
        }
        let floats = Tensor<Float>(logits.dataType == .float ? logits : logits.copy(to: .float)).scalars()
        let vocab = logits.shape.last ?? floats.count
        return Array(floats.suffix(vocab))  // [1, vocab] or [1, T, vocab]: the last token's row
    }
}
#endif
