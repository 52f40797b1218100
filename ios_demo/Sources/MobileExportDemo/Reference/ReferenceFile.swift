// Never compiled: written without Xcode (see ios_demo/README.md).
import Foundation

/// A bundle's `reference.json`: the original model's greedy continuation and top-k
/// log-probabilities on a few fixed prompts, and the limits a runtime must meet against them
/// (schema `mobile-export.reference` v1; `mobile_export/reference.py`).
public struct ReferenceFile: Sendable {
    /// One teacher-forced step: the reference's top-k ids (best first) and their log-probabilities.
    public struct Step: Sendable {
        public let topIds: [Int]
        public let topLogprobs: [Double]
    }

    /// One fixed prompt (BOS included as the bundle's tokenizer encodes it).
    public struct Prompt: Sendable {
        public let tokenIds: [Int]
        public let greedyTokens: [Int]
        public let steps: [Step]
    }

    public let prompts: [Prompt]
    public let minTop1Agreement: Double
    public let maxAbsLogprobDiff: Double?
    public let maxMeanAbsLogprobDiff: Double?
    public let tieMargin: Double
    /// False where the figures say nothing (quantized random weights): shown, never failed.
    public let enforced: Bool
    public let newTokens: Int?
    public let topK: Int?

    /// Read and check `url`; `contextLength` bounds every prompt plus its continuation.
    public init(url: URL, contextLength: Int) throws {
        let reference = try JSONDocument(contentsOf: url)
        guard let items = reference.path("prompts") as? [[String: Any]], !items.isEmpty,
              let minTop1 = reference.path("thresholds.min_top1_agreement") as? Double
        else {
            throw MobileExportError("reference.json has no prompts or no thresholds.min_top1_agreement")
        }
        minTop1Agreement = minTop1
        maxAbsLogprobDiff = reference.path("thresholds.max_abs_logprob_diff") as? Double
        maxMeanAbsLogprobDiff = reference.path("thresholds.max_mean_abs_logprob_diff") as? Double
        tieMargin = reference.path("thresholds.tie_margin") as? Double ?? 0
        enforced = reference.path("enforced") as? Bool ?? true
        newTokens = reference.path("new_tokens") as? Int
        topK = reference.path("top_k") as? Int
        prompts = try items.enumerated().map { index, item in
            try ReferenceFile.prompt(item, index: index, contextLength: contextLength)
        }
    }

    /// One `prompts[]` item (a plain dictionary: `token_ids`, `greedy_tokens`, `steps`), checked.
    private static func prompt(_ item: [String: Any], index: Int, contextLength: Int) throws -> Prompt {
        let problem = { (what: String) in MobileExportError("reference.json prompt \(index): \(what)") }
        guard let ids = item["token_ids"] as? [Int], !ids.isEmpty,
              let greedy = item["greedy_tokens"] as? [Int],
              let rawSteps = item["steps"] as? [[String: Any]]
        else { throw problem("token_ids, greedy_tokens or steps missing") }
        let steps = try rawSteps.map { raw -> Step in
            guard let top = raw["top_ids"] as? [Int], let logprobs = raw["top_logprobs"] as? [Double],
                  !top.isEmpty, top.count == logprobs.count, logprobs.allSatisfy(\.isFinite)
            else { throw problem("a step's top_ids and top_logprobs do not match") }
            return Step(topIds: top, topLogprobs: logprobs)
        }
        guard steps.count == greedy.count else { throw problem("\(steps.count) steps for \(greedy.count) greedy tokens") }
        guard ids.count + greedy.count <= contextLength else { throw problem("longer than the context of \(contextLength)") }
        guard (ids + greedy + steps.flatMap(\.topIds)).allSatisfy({ $0 >= 0 }) else { throw problem("negative token id") }
        return Prompt(tokenIds: ids, greedyTokens: greedy, steps: steps)
    }
}
