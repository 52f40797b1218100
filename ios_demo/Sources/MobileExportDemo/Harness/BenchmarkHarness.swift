// Never compiled: written without Xcode (see ios_demo/README.md).
import Darwin
import Foundation

/// The contract's command line (`device_tests/HARNESS.md`):
/// `--bundle DIR --prompt FILE --new-tokens N --warmup W --output FILE`; relative paths are
/// taken from `base` (the app's container, where the runner copies bundles and prompts).
public struct HarnessArguments {
    public let bundle: URL
    public let prompt: URL
    public let newTokens: Int
    public let warmup: Int
    public let output: URL

    public init(argv: [String], base: URL) throws {
        var values: [String: String] = [:]
        var rest = argv[...]
        while let flag = rest.popFirst() {
            guard flag.hasPrefix("--"), let value = rest.popFirst() else {
                throw MobileExportError("harness arguments: '\(flag)' has no value")
            }
            values[flag] = value
        }
        func location(_ flag: String) throws -> URL {
            guard let value = values[flag] else { throw MobileExportError("harness arguments: \(flag) is required") }
            return value.hasPrefix("/") ? URL(fileURLWithPath: value) : base.appendingPathComponent(value)
        }
        guard let newTokens = Int(values["--new-tokens"] ?? ""), newTokens >= 1,
              let warmup = Int(values["--warmup"] ?? "0"), warmup >= 0
        else { throw MobileExportError("harness arguments: --new-tokens must be 1 or more, --warmup 0 or more") }
        self.bundle = try location("--bundle")
        self.prompt = try location("--prompt")
        self.output = try location("--output")
        self.newTokens = newTokens
        self.warmup = warmup
    }
}

/// The results file as it is built: every key goes in through `put` (a string literal each).
public final class ResultsRecord {
    private var fields: [String: Any] = [:]

    public init() {}

    public func put(_ key: String, _ value: Any?) {
        fields[key] = value ?? NSNull()
    }

    /// Pretty, sorted JSON; refused (instead of crashing `JSONSerialization`) when a number is not finite.
    public func jsonData() throws -> Data {
        guard JSONSerialization.isValidJSONObject(fields) else {
            throw MobileExportError("the results hold a value JSON cannot carry (NaN or infinity)")
        }
        return try JSONSerialization.data(withJSONObject: fields, options: [.prettyPrinted, .sortedKeys])
    }
}

/// What one harness run left: the results JSON (also written to `--output` when possible).
public struct HarnessOutcome {
    public let json: Data
    public let succeeded: Bool
    public let error: String?
    public let output: URL?

    public init(json: Data, succeeded: Bool, error: String?, output: URL?) {
        self.json = json
        self.succeeded = succeeded
        self.error = error
        self.output = output
    }
}

/// The benchmark harness of HARNESS.md on a `LanguageModelRuntime`, in this process: read the
/// manifest → load (timed) → W warm-ups → one timed greedy generation (prefill, then N−1 decode
/// steps; EOS does not stop it) → peak memory → `reference.json` teacher-forced → results file.
public enum BenchmarkHarness {
    public static let schemaVersion = 1
    public static let name = "mobile-export-ios-harness"
    public static let version = "1"
    public static let memorySource = "task_info TASK_VM_INFO resident_size_peak"
    private static var measurements = 0  // iOS cannot reset the peak: later runs in one process say so

    /// One measurement. Never throws: a failure is a results file with status "failed".
    public static func run(argv: [String], base: URL) -> HarnessOutcome {
        var runtime = ["name": "unknown", "version": "unknown"]
        var output: URL?
        var record: ResultsRecord
        var error: String?
        do {
            let arguments = try HarnessArguments(argv: argv, base: base)
            output = arguments.output
            record = try measure(arguments, runtime: &runtime)
        } catch let failure {
            error = oneLine(failure)
            record = failedRecord(error!, runtime: runtime)
        }
        var json = (try? record.jsonData()) ?? Data()
        if error == nil, json.isEmpty {
            error = "the results could not be encoded as JSON"
            json = (try? failedRecord(error!, runtime: runtime).jsonData()) ?? Data()
        }
        if let output {
            do {
                try writeAtomically(json, to: output)
            } catch let failure {
                error = "cannot write \(output.lastPathComponent): \(oneLine(failure))"
                json = (try? failedRecord(error!, runtime: runtime).jsonData()) ?? Data()
            }
        }
        return HarnessOutcome(json: json, succeeded: error == nil, error: error, output: output)
    }

    /// A results file for a run that took no measurement (also used by the XCTest on a timeout).
    public static func failedRecord(_ error: String, runtime: [String: String]) -> ResultsRecord {
        let record = ResultsRecord()
        header(record, runtime: runtime)
        record.put("status", "failed")
        record.put("error", error)
        return record
    }

    private static func header(_ record: ResultsRecord, runtime: [String: String]) {
        record.put("harness_schema_version", schemaVersion)
        record.put("harness", ["name": name, "version": version])
        record.put("runtime", runtime)
        record.put("device", DeviceFacts.current)
    }

    private static func measure(_ arguments: HarnessArguments, runtime info: inout [String: String]) throws -> ResultsRecord {
        let bundle = try BundleManifest(folder: arguments.bundle)
        let prompt = try promptTokens(arguments.prompt)
        guard prompt.count + arguments.newTokens <= bundle.contextLength else {
            throw MobileExportError("prompt \(prompt.count) + \(arguments.newTokens) new tokens exceed the bundle's context of \(bundle.contextLength)")
        }
        let reference = try bundle.referenceURL.map { try ReferenceFile(url: $0, contextLength: bundle.contextLength) }
        let runtime = try RuntimeFactory.make(for: bundle)
        info = runtime.runtimeInfo

        let before = MemoryProbe.residentBytes()
        let loadStart = Stopwatch.now
        try runtime.load()
        let loadSeconds = Stopwatch.seconds(since: loadStart)
        for _ in 0..<arguments.warmup {
            _ = try generate(runtime, prompt: prompt, newTokens: arguments.newTokens)
        }
        let timed = try generate(runtime, prompt: prompt, newTokens: arguments.newTokens)
        guard let peak = MemoryProbe.peakResidentBytes() else { throw MobileExportError("task_info(TASK_VM_INFO) failed") }
        let source = memorySource + (measurements > 0 ? ", not reset: includes the process's earlier peak" : "")
        measurements += 1
        // After the measurement and the peak: neither the timings nor the peak include it.
        let outputs = try reference.map { try ReferenceRunner.run(runtime, $0).map(\.json) }

        let n = arguments.newTokens
        let record = ResultsRecord()
        header(record, runtime: info)
        record.put("status", "ok")
        record.put("error", nil)
        record.put("bundle_manifest_sha256", bundle.manifestSHA256)
        record.put("prompt_tokens", prompt.count)
        record.put("generated_tokens", timed.generated)
        record.put("load_s", loadSeconds)
        record.put("ttft_s", timed.prefillSeconds)
        record.put("prefill_s", timed.prefillSeconds)
        record.put("decode_s", timed.decodeSeconds)
        record.put("prefill_tokens_per_s", timed.prefillSeconds > 0 ? Double(prompt.count) / timed.prefillSeconds : 0)
        record.put("decode_tokens_per_s", n > 1 && timed.decodeSeconds > 0 ? Double(n - 1) / timed.decodeSeconds : 0)
        record.put("peak_memory_bytes", Int(clamping: peak))
        record.put("memory_source", source)
        record.put("rss_before_load_bytes", before.map { Int(clamping: $0) })
        record.put("reference_outputs", outputs)
        return record
    }

    /// Timings of one greedy generation of exactly `newTokens` tokens.
    struct Generation {
        var generated = 0
        var prefillSeconds = 0.0
        var decodeSeconds = 0.0
    }

    /// Prefill the prompt (time to the first token), then N−1 single-token decode steps.
    static func generate(_ runtime: LanguageModelRuntime, prompt: [Int32], newTokens: Int) throws -> Generation {
        var result = Generation()
        let start = Stopwatch.now
        var token = argmax(try runtime.step(tokens: prompt, startPos: 0))
        result.prefillSeconds = Stopwatch.seconds(since: start)
        result.generated = 1
        let decodeStart = Stopwatch.now
        var position = prompt.count
        while result.generated < newTokens {
            token = argmax(try runtime.step(tokens: [Int32(token)], startPos: position))
            position += 1
            result.generated += 1
        }
        result.decodeSeconds = Stopwatch.seconds(since: decodeStart)
        return result
    }

    /// The prompt file: `{"token_ids": [int, ...]}`, tokenized on the host.
    static func promptTokens(_ url: URL) throws -> [Int32] {
        let data = try Data(contentsOf: url)
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              let ids = object["token_ids"] as? [Int], !ids.isEmpty,
              ids.allSatisfy({ $0 >= 0 && $0 <= Int(Int32.max) })
        else { throw MobileExportError("\(url.lastPathComponent) has no token_ids") }
        return ids.map { Int32($0) }
    }

    /// The results file, written to a temporary name in its folder and renamed into place.
    public static func writeAtomically(_ data: Data, to url: URL) throws {
        let folder = url.deletingLastPathComponent()
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        let temporary = folder.appendingPathComponent(".\(url.lastPathComponent).tmp-\(getpid())")
        try data.write(to: temporary)
        guard rename(temporary.path, url.path) == 0 else {
            let reason = String(cString: strerror(errno))
            try? FileManager.default.removeItem(at: temporary)
            throw MobileExportError("rename failed: \(reason)")
        }
    }

    /// An error as the contract's one line.
    static func oneLine(_ error: Error) -> String {
        let text = (error as? MobileExportError)?.message ?? "\(type(of: error)): \(error.localizedDescription)"
        return text.replacingOccurrences(of: "\n", with: " ")
    }
}

/// Monotonic seconds.
enum Stopwatch {
    static var now: UInt64 { DispatchTime.now().uptimeNanoseconds }
    static func seconds(since start: UInt64) -> Double { Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 }
}

/// This process's memory as the kernel counts it (`task_info(TASK_VM_INFO)`).
public enum MemoryProbe {
    private static func vmInfo() -> task_vm_info_data_t? {
        var info = task_vm_info_data_t()
        var count = mach_msg_type_number_t(MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<integer_t>.size)
        let result = withUnsafeMutablePointer(to: &info) { pointer in
            pointer.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
                task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), $0, &count)
            }
        }
        return result == KERN_SUCCESS ? info : nil
    }

    /// Peak resident memory of the process so far (`resident_size_peak`), bytes.
    public static func peakResidentBytes() -> UInt64? { vmInfo()?.resident_size_peak }

    /// Resident memory now (`resident_size`), bytes.
    public static func residentBytes() -> UInt64? { vmInfo()?.resident_size }
}

/// Facts the harness knows better than the transport (the results file's optional `device`).
enum DeviceFacts {
    static var current: [String: String] {
        var system = utsname()
        uname(&system)
        let machine = withUnsafeBytes(of: &system.machine) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        #if os(iOS)
        let os = "iOS"
        #else
        let os = "macOS"
        #endif
        return ["model": machine, "os": os, "os_version": ProcessInfo.processInfo.operatingSystemVersionString]
    }
}
