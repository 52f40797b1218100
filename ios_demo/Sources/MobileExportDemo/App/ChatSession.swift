// Never compiled: written without Xcode (see ios_demo/README.md).
import Foundation
import SwiftUI

/// The opened bundle, its reference check and the chat, for the views (main actor). The model
/// work runs in `ChatEngine`, off the main thread.
@MainActor
public final class ChatSession: ObservableObject {
    @Published public private(set) var bundle: BundleManifest?
    @Published public private(set) var status = "Pick a bundle folder."
    @Published public private(set) var parity: ParityReport?
    @Published public private(set) var turns: [ChatTurn] = []
    @Published public private(set) var speed = ""
    @Published public private(set) var busy = false

    /// Longest reply, in tokens (the context is the other limit).
    public var maxReplyTokens = 512

    private var engine: ChatEngine?
    private var scopedFolder: URL?

    public init() {}

    public var canChat: Bool { engine != nil && !busy }

    /// Open a bundle folder: read the manifest, load the artifact and tokenizer, run `reference.json`.
    public func open(_ folder: URL) {
        guard !busy else { return }
        scopedFolder?.stopAccessingSecurityScopedResource()
        scopedFolder = folder.startAccessingSecurityScopedResource() ? folder : nil  // a folder from the picker
        engine = nil
        bundle = nil
        parity = nil
        turns = []
        speed = ""
        busy = true
        status = "Loading \(folder.lastPathComponent)…"
        Task {
            defer { busy = false }
            do {
                let bundle = try BundleManifest(folder: folder)
                self.bundle = bundle
                let engine = try await Task.detached(priority: .userInitiated) { try await ChatEngine.open(bundle) }.value
                self.engine = engine
                status = String(format: "Loaded in %.2f s.", engine.loadSeconds)
                guard bundle.referenceURL != nil else {
                    status += " The bundle has no reference.json: no check."
                    return
                }
                status += " Checking reference.json…"
                parity = try await Task.detached(priority: .userInitiated) { try engine.checkReference() }.value
                status = String(format: "Loaded in %.2f s.", engine.loadSeconds)
            } catch {
                status = BenchmarkHarness.oneLine(error)
            }
        }
    }

    /// Send a user message and stream the assistant's reply into the last turn.
    public func send(_ text: String) {
        let message = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let engine, !busy, !message.isEmpty else { return }
        turns.append(ChatTurn(role: "user", text: message))
        let conversation = turns
        turns.append(ChatTurn(role: "assistant", text: ""))
        let index = turns.count - 1
        let limit = maxReplyTokens
        busy = true
        Task {
            defer { busy = false }
            let progress = AsyncThrowingStream<ReplyProgress, Error> { continuation in
                Task.detached(priority: .userInitiated) {
                    do {
                        try engine.reply(to: conversation, maxNewTokens: limit) { continuation.yield($0) }
                        continuation.finish()
                    } catch {
                        continuation.finish(throwing: error)
                    }
                }
            }
            do {
                for try await update in progress {
                    turns[index].text = update.text
                    speed = update.speed
                }
            } catch {
                speed = BenchmarkHarness.oneLine(error)
            }
        }
    }

    /// Forget the conversation (the next reply starts a fresh sequence).
    public func newChat() {
        guard !busy else { return }
        turns = []
        speed = ""
        engine?.forgetConversation()
    }
}

/// The text of a reply so far and its speed.
struct ReplyProgress: Sendable {
    let text: String
    let speed: String
}

/// A loaded runtime and tokenizer with the tokens its KV cache holds, used by one task at a time.
final class ChatEngine: @unchecked Sendable {
    let bundle: BundleManifest
    let runtime: LanguageModelRuntime
    let tokenizer: BundleTokenizer
    let loadSeconds: Double
    private var cached: [Int32] = []  // the tokens the runtime's sequence holds, in order

    private init(bundle: BundleManifest, runtime: LanguageModelRuntime, tokenizer: BundleTokenizer, loadSeconds: Double) {
        self.bundle = bundle
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.loadSeconds = loadSeconds
    }

    static func open(_ bundle: BundleManifest) async throws -> ChatEngine {
        let runtime = try RuntimeFactory.make(for: bundle)
        let start = Stopwatch.now
        try runtime.load()
        let seconds = Stopwatch.seconds(since: start)
        let tokenizer = try await BundleTokenizer.load(bundle)
        return ChatEngine(bundle: bundle, runtime: runtime, tokenizer: tokenizer, loadSeconds: seconds)
    }

    /// The reference protocol on this runtime, checked with the reference's own thresholds.
    func checkReference() throws -> ParityReport? {
        guard let url = bundle.referenceURL else { return nil }
        let reference = try ReferenceFile(url: url, contextLength: bundle.contextLength)
        defer { cached = [] }  // the reference left its own sequence in the cache
        return ParityReport(reference: reference, outputs: try ReferenceRunner.run(runtime, reference))
    }

    func forgetConversation() { cached = [] }

    /// Greedy reply to `conversation` (the chat template re-renders it whole; the part the cache
    /// already holds is not fed again). Stops at any of the bundle's EOS / end-of-turn ids.
    func reply(to conversation: [ChatTurn], maxNewTokens: Int, onUpdate: (ReplyProgress) -> Void) throws {
        let prompt = try tokenizer.promptTokens(for: conversation)
        guard prompt.count < runtime.maxSeqLen else {
            throw MobileExportError("the conversation fills the context of \(runtime.maxSeqLen) tokens: start a new chat")
        }
        let reused = min(zip(cached, prompt).prefix { $0 == $1 }.count, prompt.count - 1)
        let start = Stopwatch.now
        var logits = try runtime.step(tokens: Array(prompt[reused...]), startPos: reused)
        cached = prompt
        let prefillSeconds = Stopwatch.seconds(since: start)
        let decodeStart = Stopwatch.now
        var generated: [Int] = []
        var decodeSteps = 0
        let stops = bundle.stopIds
        while true {
            let token = argmax(logits)
            if stops.contains(token) { break }
            generated.append(token)
            let text = tokenizer.decode(generated)
            if !text.hasSuffix("\u{FFFD}") {  // hold back an incomplete UTF-8 character
                let decodeRate = decodeSteps > 0 ? Double(decodeSteps) / Stopwatch.seconds(since: decodeStart) : 0
                let prefillRate = Double(prompt.count - reused) / max(prefillSeconds, 1e-9)
                onUpdate(ReplyProgress(text: text, speed: String(
                    format: "%d tokens · prefill %.0f tok/s · decode %.1f tok/s", generated.count, prefillRate, decodeRate
                )))
            }
            if generated.count >= maxNewTokens || cached.count >= runtime.maxSeqLen { break }
            logits = try runtime.step(tokens: [Int32(token)], startPos: cached.count)
            cached.append(Int32(token))
            decodeSteps += 1
        }
    }
}
