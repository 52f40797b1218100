// Never compiled: written without Xcode (see ios_demo/README.md).
import Foundation

/// What a runtime produced for one reference prompt: its argmax at each teacher-forced step and
/// its log-probabilities (5 decimals) of that step's reference `top_ids`.
public struct PromptOutput: Sendable {
    public let tokens: [Int]
    public let logprobs: [[Double]]

    /// The results file's form, `{"tokens": [...], "logprobs": [[...]]}` (non-finite values as null,
    /// which the runner's check reports as malformed: garbage never passes).
    public var json: [String: Any] {
        ["tokens": tokens, "logprobs": logprobs.map { row in row.map { $0.isFinite ? $0 as Any : NSNull() } }]
    }
}

/// The teacher-forced protocol of HARNESS.md: per prompt, a fresh sequence; prefill `token_ids`
/// at position 0, then feed `greedy_tokens[0..n-2]` one at a time; step `i` is the distribution
/// after the prefill (i = 0) or after the i-th fed token.
public enum ReferenceRunner {
    public static func run(_ runtime: LanguageModelRuntime, _ reference: ReferenceFile) throws -> [PromptOutput] {
        try reference.prompts.map { prompt -> PromptOutput in
            var tokens: [Int] = []
            var logprobs: [[Double]] = []
            var position = 0
            for (index, step) in prompt.steps.enumerated() {
                let fed = index == 0 ? prompt.tokenIds : [prompt.greedyTokens[index - 1]]
                let logits = try runtime.step(tokens: fed.map { Int32(clamping: $0) }, startPos: position)
                position += fed.count
                let distribution = LogSoftmax(logits)
                tokens.append(argmax(logits))
                logprobs.append(step.topIds.map { id in
                    id < logits.count ? (distribution[id] * 100_000).rounded() / 100_000 : -.infinity
                })
            }
            return PromptOutput(tokens: tokens, logprobs: logprobs)
        }
    }
}

/// Figures of one prompt against the reference, as `mobile_export/reference.py: check_outputs`.
public struct PromptParity: Sendable {
    public let agreement: Double
    public let maxAbsDiff: Double
    public let meanAbsDiff: Double
    public let failures: [String]
}

/// The check of a runtime's outputs against `reference.json`, with the file's own thresholds.
public struct ParityReport: Sendable {
    public let prompts: [PromptParity]
    public let enforced: Bool
    /// The reference's own limits, in words ("agreement ≥ 90% (tie margin 0.1), max ≤ 0.25, mean ≤ 0.05 nat").
    public let limits: String

    /// True when every prompt met the thresholds (always true when the reference is not enforced).
    public var passed: Bool { !enforced || prompts.allSatisfy { $0.failures.isEmpty } }

    public init(reference: ReferenceFile, outputs: [PromptOutput]) {
        enforced = reference.enforced
        var words = [String(format: "agreement ≥ %.0f%% (tie margin %g)", reference.minTop1Agreement * 100, reference.tieMargin)]
        if let limit = reference.maxAbsLogprobDiff { words.append(String(format: "max ≤ %g", limit)) }
        if let limit = reference.maxMeanAbsLogprobDiff { words.append(String(format: "mean ≤ %g nat", limit)) }
        limits = words.joined(separator: ", ")
        prompts = zip(reference.prompts, outputs).map { prompt, output in
            ParityReport.check(prompt, output, reference)
        }
    }

    private static func check(_ prompt: ReferenceFile.Prompt, _ output: PromptOutput, _ limits: ReferenceFile) -> PromptParity {
        var agree = 0
        var diffs: [Double] = []
        for (i, step) in prompt.steps.enumerated() {
            let token = output.tokens[i]
            if token == prompt.greedyTokens[i] {
                agree += 1
            } else if let at = step.topIds.firstIndex(of: token), step.topLogprobs[0] - step.topLogprobs[at] <= limits.tieMargin {
                agree += 1  // a near-tie: another of the reference's top-k, within the tie margin of the best
            }
            diffs += zip(output.logprobs[i], step.topLogprobs).map { abs($0 - $1) }
        }
        let agreement = prompt.steps.isEmpty ? 1 : Double(agree) / Double(prompt.steps.count)
        let maxDiff = diffs.max() ?? 0
        let meanDiff = diffs.isEmpty ? 0 : diffs.reduce(0, +) / Double(diffs.count)
        var failures: [String] = []
        if agreement < limits.minTop1Agreement {
            failures.append(String(format: "greedy agreement %.0f%% < %.0f%%", agreement * 100, limits.minTop1Agreement * 100))
        }
        if let limit = limits.maxAbsLogprobDiff, !(maxDiff <= limit) {
            failures.append(String(format: "max |log-prob diff| %.3g > %g", maxDiff, limit))
        }
        if let limit = limits.maxMeanAbsLogprobDiff, !(meanDiff <= limit) {
            failures.append(String(format: "mean |log-prob diff| %.3g > %g", meanDiff, limit))
        }
        return PromptParity(agreement: agreement, maxAbsDiff: maxDiff, meanAbsDiff: meanDiff, failures: failures)
    }
}

/// Natural-log softmax of one logits row, computed in Double (`distribution[id]`).
public struct LogSoftmax {
    private let logits: [Float]
    private let logSumExp: Double

    public init(_ logits: [Float]) {
        self.logits = logits
        let top = Double(logits.max() ?? 0)
        logSumExp = top + log(logits.reduce(0.0) { $0 + exp(Double($1) - top) })
    }

    public subscript(id: Int) -> Double { Double(logits[id]) - logSumExp }
}

/// Index of the largest logit (the greedy token).
public func argmax(_ logits: [Float]) -> Int {
    var best = 0
    for i in logits.indices where logits[i] > logits[best] { best = i }
    return best
}
