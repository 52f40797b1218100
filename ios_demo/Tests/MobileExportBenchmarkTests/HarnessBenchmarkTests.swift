// Never compiled: written without Xcode (see ios_demo/README.md).
import Foundation
import XCTest
@testable import MobileExportDemo  // the package library, or the app module when the sources are in the app target

/// The device-test runner's iOS harness (`device_tests/HARNESS.md`), run as
/// `-only-testing:MobileExportBenchmarkTests/HarnessTests/testHarness` in a unit-test target
/// hosted by the demo app, so relative paths are in the app's data container.
///
/// - `xcodebuild test-without-building` (kind `ios`): `MOBILE_EXPORT_HARNESS_ARGS` =
///   `{"argv": [...], "timeout_s": T}` (sent as `TEST_RUNNER_MOBILE_EXPORT_HARNESS_ARGS`); one
///   measurement, its results attached as `mobile-export-results.json`, kept always.
/// - AWS Device Farm (kind `devicefarm`): `{repetition}` in `--output`, the numbers in
///   `MOBILE_EXPORT_REPETITIONS`, the limit in `MOBILE_EXPORT_TIMEOUT_S`; one measurement per
///   repetition, each left as `Documents/mobile-export-results/mobile-export-results-<n>.json`.
final class HarnessTests: XCTestCase {
    func testHarness() throws {
        let environment = ProcessInfo.processInfo.environment
        guard let raw = environment["MOBILE_EXPORT_HARNESS_ARGS"] else {
            throw XCTSkip("MOBILE_EXPORT_HARNESS_ARGS is not set: the device-test runner sets it")
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(raw.utf8)) as? [String: Any],
              let argv = object["argv"] as? [String]
        else { return XCTFail("MOBILE_EXPORT_HARNESS_ARGS is not {\"argv\": [...]}: \(raw.prefix(80))") }
        let timeout = (object["timeout_s"] as? Double)
            ?? environment["MOBILE_EXPORT_TIMEOUT_S"].flatMap { Double($0) } ?? 600
        executionTimeAllowance = timeout + 60

        guard let repetitions = environment["MOBILE_EXPORT_REPETITIONS"] else {
            let outcome = runHarness(argv, timeout: timeout)
            attach(outcome.json, named: "mobile-export-results.json")
            XCTAssertTrue(outcome.succeeded, outcome.error ?? "the harness failed")
            return
        }
        for number in repetitions.split(separator: ",").compactMap({ Int($0.trimmingCharacters(in: .whitespaces)) }) {
            let name = "mobile-export-results-\(number).json"
            let outcome = runHarness(argv.map { $0.replacingOccurrences(of: "{repetition}", with: String(number)) }, timeout: timeout)
            attach(outcome.json, named: name)
            if outcome.output == nil {  // no usable --output: leave the file where Device Farm collects it
                let fallback = URL(fileURLWithPath: NSHomeDirectory())
                    .appendingPathComponent("Documents/mobile-export-results/\(name)")
                try? BenchmarkHarness.writeAtomically(outcome.json, to: fallback)
            }
            XCTAssertTrue(outcome.succeeded, "repetition \(number): \(outcome.error ?? "the harness failed")")
        }
    }

    /// One harness run off the main thread, given up after `timeout` seconds (then the results
    /// say so; the runner also enforces its limit from outside).
    private func runHarness(_ argv: [String], timeout: Double) -> HarnessOutcome {
        let done = expectation(description: "harness")
        let box = OutcomeBox()
        DispatchQueue.global(qos: .userInitiated).async {
            box.value = BenchmarkHarness.run(argv: argv, base: URL(fileURLWithPath: NSHomeDirectory()))
            done.fulfill()
        }
        if XCTWaiter().wait(for: [done], timeout: timeout) == .completed, let outcome = box.value {
            return outcome
        }
        let error = "no result within the time limit of \(Int(timeout))s"
        let record = BenchmarkHarness.failedRecord(error, runtime: ["name": "unknown", "version": "unknown"])
        return HarnessOutcome(json: (try? record.jsonData()) ?? Data(), succeeded: false, error: error, output: nil)
    }

    /// The results file as an attachment the runner exports with `xcresulttool`.
    private func attach(_ json: Data, named name: String) {
        let attachment = XCTAttachment(data: json, uniformTypeIdentifier: "public.json")
        attachment.name = name
        attachment.lifetime = .keepAlways
        add(attachment)
    }
}

/// Carries the outcome from the harness thread; the expectation orders the write before the read.
private final class OutcomeBox: @unchecked Sendable {
    var value: HarnessOutcome?
}
