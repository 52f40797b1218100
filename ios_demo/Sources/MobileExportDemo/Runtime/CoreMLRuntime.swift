// Never compiled: written without Xcode (see ios_demo/README.md).
import CoreML
import Foundation

/// A mobile-export Core ML package (`coreml-mlpackage`, iOS 18+), stepped like a runner.
///
/// Calling convention (`mobile_export/backends/coreml.py`): `input_ids` int32 [1, T] holds the
/// tokens at positions end-T ..< end; `causal_mask` fp16 [1, 1, T, end] is additive (0 = attend,
/// -inf = masked; query i, at position end-T+i, sees keys 0 ... end-T+i); `logits` fp16
/// [1, vocab] is the last token's. The KV cache is the model's state: one `MLState` from
/// `makeState()` per sequence, a new one whenever `startPos == 0`.
public final class CoreMLRuntime: LanguageModelRuntime {
    public static let format = "coreml-mlpackage"
    static let inputNames = ["input_ids", "causal_mask"]

    public let maxSeqLen: Int
    public private(set) var vocabSize: Int?
    public var runtimeInfo: [String: String] {
        ["name": "coreml", "version": ProcessInfo.processInfo.operatingSystemVersionString]
    }

    private let packageURL: URL
    private let computeUnits: MLComputeUnits
    private var compiledURL: URL?
    private var model: MLModel?
    private var state: MLState?
    private var position = 0  // tokens the current state holds

    public init(bundle: BundleManifest) throws {
        guard bundle.stateCount > 0 else {
            throw MobileExportError("the Core ML package has no state: this app needs the KV cache as MLState")
        }
        guard Set(bundle.inputNames) == Set(CoreMLRuntime.inputNames) else {
            throw MobileExportError("the Core ML package's inputs are \(bundle.inputNames), not input_ids and causal_mask")
        }
        maxSeqLen = bundle.contextLength
        packageURL = bundle.artifactURL
        computeUnits = try CoreMLRuntime.units(bundle.computeUnits ?? "cpu_and_gpu")
    }

    deinit {
        if let compiledURL { try? FileManager.default.removeItem(at: compiledURL) }
    }

    /// The manifest's `artifact.compute_units` as Core ML's enum.
    static func units(_ name: String) throws -> MLComputeUnits {
        switch name {
        case "all": return .all
        case "cpu_only": return .cpuOnly
        case "cpu_and_gpu": return .cpuAndGPU
        case "cpu_and_ne": return .cpuAndNeuralEngine
        default: throw MobileExportError("unknown compute units '\(name)' in the manifest")
        }
    }

    /// Compile the .mlpackage on the device (a picked folder is not compiled by Xcode) and load it.
    public func load() throws {
        let compiled = try MLModel.compileModel(at: packageURL)
        compiledURL = compiled
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
        let model = try MLModel(contentsOf: compiled, configuration: configuration)
        vocabSize = model.modelDescription.outputDescriptionsByName["logits"]?
            .multiArrayConstraint?.shape.last?.intValue
        self.model = model
        state = nil
        position = 0
    }

    public func step(tokens: [Int32], startPos: Int) throws -> [Float] {
        guard let model else { throw MobileExportError("the Core ML model is not loaded") }
        try checkStep(tokens, startPos)
        if startPos == 0 || state == nil {
            state = model.makeState()
            position = 0
        }
        guard let state, startPos <= position else {
            throw MobileExportError("step at position \(startPos), but the sequence holds only \(position) tokens")
        }
        let end = startPos + tokens.count
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": MLFeatureValue(multiArray: try CoreMLRuntime.inputIds(tokens)),
            "causal_mask": MLFeatureValue(multiArray: try CoreMLRuntime.causalMask(queries: tokens.count, end: end)),
        ])
        let outputs = try model.prediction(from: inputs, using: state)
        position = end
        guard let logits = outputs.featureValue(for: "logits")?.multiArrayValue else {
            throw MobileExportError("the Core ML model returned no 'logits'")
        }
        return CoreMLRuntime.lastRow(of: logits)
    }

    /// int32 [1, T].
    static func inputIds(_ tokens: [Int32]) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: [1, NSNumber(value: tokens.count)], dataType: .int32)
        array.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, strides in
            for (i, token) in tokens.enumerated() { buffer[i * strides[1]] = token }
        }
        return array
    }

    /// fp16 [1, 1, T, end], additive: query i (position end-T+i) may see keys 0 ... end-T+i.
    static func causalMask(queries: Int, end: Int) throws -> MLMultiArray {
        let shape = [1, 1, queries, end].map { NSNumber(value: $0) }
        let array = try MLMultiArray(shape: shape, dataType: .float16)
        let first = end - queries
        array.withUnsafeMutableBufferPointer(ofType: Float16.self) { buffer, strides in
            for i in 0..<queries {
                for j in 0..<end {
                    buffer[i * strides[2] + j * strides[3]] = j <= first + i ? 0 : -Float16.infinity
                }
            }
        }
        return array
    }

    /// The last row of a logits array ([1, vocab], or [1, T, vocab]) as Float, following its strides.
    static func lastRow(of array: MLMultiArray) -> [Float] {
        let shape = array.shape.map(\.intValue)
        let strides = array.strides.map(\.intValue)
        let width = shape.last ?? 0
        let step = strides.last ?? 1
        let base = zip(shape.dropLast(), strides.dropLast()).reduce(0) { $0 + ($1.0 - 1) * $1.1 }
        switch array.dataType {
        case .float16:
            return array.withUnsafeBufferPointer(ofType: Float16.self) { p in (0..<width).map { Float(p[base + $0 * step]) } }
        case .float32:
            return array.withUnsafeBufferPointer(ofType: Float.self) { p in (0..<width).map { p[base + $0 * step] } }
        default:
            let lead = shape.dropLast().map { NSNumber(value: $0 - 1) }
            return (0..<width).map { array[lead + [NSNumber(value: $0)]].floatValue }
        }
    }
}
